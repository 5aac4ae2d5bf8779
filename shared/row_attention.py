"""Batch-invariant attention: each query row's result independent of the forward it runs in.

Greedy decoding equals the target's own greedy output only if the target's
logits for a position are the same bits however the position is computed. It
may be computed one token at a time (AR), inside a (K + 1)-token verification,
or packed with other requests' tokens. In bf16 the bits differ by default, for
two reasons:

- torch 2.13's CPU matmul kernels round a row of a linear layer differently
  when the forward has few rows. Above a kernel-specific row count, a row's
  result does not depend on how many rows there are or on where the row sits
  among them: from 2 rows for bf16 with AVX512-BF16 (oneDNN), from 4 for fp32
  with AVX2 (MKL), and from 1 for bf16 without native bf16 instructions, on the
  machines this was measured on. ``min_invariant_rows`` measures that count for
  the model's own layers at start-up, and the target pads smaller forwards to it.
- SDPA's fused attention splits the keys into blocks whose boundaries depend on
  the query and key counts and, in a packed batch, on where a sequence's keys
  lie. Its online softmax then rounds differently.

``row_attention`` therefore computes attention one query row at a time, on
exactly the keys that row may see, in the order the sequence added them. The
inputs of that computation are then the same in every kind of forward, and so
is its result. The caller describes the rows with ``Segment`` objects passed in
``attention_plan``. A forward run without a plan (prefill) uses SDPA.

NOTE: the probe tries the row counts in ``PROBE_ROWS``; a forward with more rows
is assumed to round like the largest of them. Kernels such as cuBLAS may pick
other algorithms for other row counts, so the probe runs only on CPUs.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IMPLEMENTATION = "saguaro_rows"
# Row counts ``min_invariant_rows`` tries: every count up to 24, where kernels switch paths (with two
# threads, MKL's fp32 kernel on AVX2 rounded the tail rows of 5 to 11-row forwards differently), then
# larger steps up to a packed verification of 8 requests with K = 4 (40 rows) and beyond.
PROBE_ROWS = tuple(range(1, 25)) + (32, 40, 48, 64)
# Output features a probe uses at most per layer, so that probing the output layer takes about a second.
# NOTE: this assumes that a kernel rounds a row the same way for every output-feature count above it.
PROBE_MAX_FEATURES = 8192


@dataclass(frozen=True)
class Segment:
    """The query rows of one sequence in a forward and the keys they may see.

    Rows ``query_start`` to ``query_end - 1`` are the sequence's new tokens in order.
    ``columns`` lists the key/value indices of the sequence's tokens in the order
    they were added (None: every key of the forward, as for one sequence in its own
    cache). Row ``query_start + i`` attends to the first ``prefix + i + 1`` of them,
    which are the sequence's earlier tokens and its new tokens up to itself.
    """

    query_start: int
    query_end: int
    prefix: int
    columns: torch.Tensor | None = None


_plan: contextvars.ContextVar[Sequence[Segment] | None] = contextvars.ContextVar("saguaro_attention_plan", default=None)


@contextlib.contextmanager
def attention_plan(segments: Sequence[Segment]) -> Iterator[None]:
    """Run model forwards in this block with row-by-row attention over ``segments``."""
    token = _plan.set(segments)
    try:
        yield
    finally:
        _plan.reset(token)


def row_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Compute attention row by row under the active plan; without one, call SDPA.

    ``query`` is [1, heads, Q, head_dim] and ``key``/``value`` [1, kv_heads, KV,
    head_dim], after the cache update. Returns [1, Q, heads, head_dim] like the
    transformers attention functions. The mask is ignored under a plan, because
    the segments define which keys each row attends to.
    """
    segments = _plan.get()
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    batch, heads, rows, head_dim = query.shape
    kv_heads = key.shape[1]
    if batch != 1:
        raise ValueError(f"row attention needs a batch of one packed sequence, got batch {batch}")
    covered = sum(s.query_end - s.query_start for s in segments)
    if covered != rows:
        raise ValueError(f"the attention plan covers {covered} query rows but the forward has {rows}; give every sequence in the forward a Segment")
    if scaling is None:
        scaling = head_dim**-0.5
    groups = heads // kv_heads

    output = query.new_empty(rows, heads, head_dim)
    for segment in segments:
        if segment.columns is None:
            keys, values = key[0], value[0]
        else:
            keys, values = key[0].index_select(1, segment.columns), value[0].index_select(1, segment.columns)
        for row in range(segment.query_start, segment.query_end):
            visible = segment.prefix + row - segment.query_start + 1
            # The query heads that share a key/value head form one [groups, head_dim] block, so
            # every matmul has the same shape for a given visible length.
            row_query = query[0, :, row, :].reshape(kv_heads, groups, head_dim)
            scores = torch.matmul(row_query, keys[:, :visible].transpose(1, 2)) * scaling
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            output[row] = torch.matmul(weights, values[:, :visible]).reshape(heads, head_dim)
    return output[None], None


def install(model) -> None:
    """Register ``row_attention`` with transformers and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, row_attention)
    # Forwards without a plan build the same masks as SDPA.
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(IMPLEMENTATION)


@torch.inference_mode()
def min_invariant_rows(model, rows: Sequence[int] = PROBE_ROWS) -> int | None:
    """Return the fewest rows from which every linear layer of ``model`` computes a row the same way, or None.

    For each distinct layer shape and dtype the probe multiplies random inputs
    with the layer's weight at every count in ``rows``, once with the probed
    row first and once with it last, because multithreaded kernels may treat
    the tail rows of a forward differently. A forward with at least the returned
    number of rows then gives each row the same bits at any larger probed count
    and position, with the current torch thread count. None means that no
    probed count qualifies.
    """
    layers = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            layers.setdefault((module.in_features, module.out_features, module.weight.dtype), module)
    generator = torch.Generator().manual_seed(0)
    needed = 1
    for (in_features, _, dtype), layer in layers.items():
        weight = layer.weight[:PROBE_MAX_FEATURES]
        bias = None if layer.bias is None else layer.bias[:PROBE_MAX_FEATURES]
        x = torch.randn(max(rows), in_features, generator=generator).to(dtype=dtype, device=weight.device)
        reference = torch.nn.functional.linear(x[: rows[-1]], weight, bias)[0]

        def same_at(count: int) -> bool:
            first = torch.nn.functional.linear(x[:count], weight, bias)[0]
            last = torch.nn.functional.linear(torch.cat([x[1:count], x[:1]]), weight, bias)[-1]
            return torch.equal(first, reference) and torch.equal(last, reference)

        if not same_at(rows[-1]):
            return None
        start = len(rows) - 1
        while start > 0 and same_at(rows[start - 1]):
            start -= 1
        if start == len(rows) - 1:
            return None
        needed = max(needed, rows[start])
    return needed
