"""Batch-invariant target forwards: each row's result independent of the forward it runs in.

Greedy decoding equals the target's own greedy output only if the target's
logits for a position are the same bits however the position is computed. It
may be computed one token at a time (AR), inside a (K + 1)-token verification,
or packed with other requests' tokens. In bf16 the bits differ by default, for
two reasons:

- torch 2.13's CPU matmul kernels pick their blocking from the number of rows,
  so a row of a linear layer rounds differently in forwards of different
  sizes. Within some set of row counts they round every row alike, wherever
  it sits among the others. With one thread on an Intel Xeon with AMX, bf16
  rows round alike at 2 to 32 rows (oneDNN sums 1, 33, 34 to 36, 37 to 56
  and 57 to 64 rows in other orders) and fp32 rows at 16 to 64
  (``python -m bench.row_classes``). With AMX disabled through
  ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``, bf16 rows round alike at 2 to 64.
  With MKL, oneDNN and ATen held to AVX2, fp32 rows round alike at 4 to 6, 10
  to 12, and so on up to 52 to 54 rows. At the counts in between, a row's
  result depends on its position. ``invariant_rows`` measures that set for
  the model's own layers at start-up. Under ``linear_rows`` every linear
  layer of a model with ``install`` pads its input to the next count of the
  set and splits larger inputs into chunks.
- SDPA's fused attention splits the keys into blocks whose boundaries depend on
  the query and key counts and, in a packed batch, on where a sequence's keys
  lie. Its online softmax then rounds differently.

``row_attention`` therefore computes attention one query row at a time, on
exactly the keys that row may see, in the order the sequence added them. The
inputs of that computation are then the same in every kind of forward, and so
is its result. The caller describes the rows with ``Segment`` objects passed in
``attention_plan``. A forward run without a plan (prefill) uses SDPA and plain
linear layers.

The probe tries every row count up to ``PROBE_MAX_ROWS``, so a set ends there
at the latest, and larger decode forwards run their linear layers in chunks.
NOTE: kernels such as cuBLAS may pick other algorithms for other row counts, so
the probe runs only on CPUs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IMPLEMENTATION = "saguaro_rows"
# ``invariant_rows`` tries every row count up to this one, because kernels switch paths at counts
# that differ by kernel and thread count (see the module docstring).
PROBE_MAX_ROWS = 64
# Output features a probe uses at most per layer with one torch thread, so that the probe takes seconds.
# With more threads the probe uses every feature, because MKL's fp32 kernel held to AVX2 split
# the work by the output-feature count there: at 2 threads a capped probe passed row counts that
# a 1536-feature layer computed differently.
# NOTE: with one thread this assumes that a kernel sums a row the same way for every output-feature
# count above the cap. For Qwen2.5-Coder-1.5B on an AMX Xeon a probe of every feature gave the
# same classes (bench/results/row-classes-full.md); other CPUs and kernels are unchecked.
PROBE_MAX_FEATURES = 1024


@dataclass(frozen=True)
class RowRange:
    """Row counts at which linear layers round every row alike.

    These are the counts from ``low`` to ``high`` (None: no limit), or only
    those in ``counts`` when it is set. Some kernels leave gaps. MKL's AVX2
    fp32 kernel, for one, rounds rows alike at 4 to 6, 10 to 12, 16 to 18 rows
    and so on (``bench/results/row-classes-avx2.md``). At the counts in
    between, a row's result depends on its position.
    """

    low: int
    high: int | None = None
    counts: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if self.low < 1 or (self.high is not None and self.high < self.low):
            raise ValueError(f"invalid row range {self.low}..{self.high}: need 1 <= low <= high")
        if self.counts is not None and (self.high is None or min(self.counts) != self.low or max(self.counts) != self.high):
            raise ValueError(f"invalid row counts {sorted(self.counts)}: they must run from low ({self.low}) to high ({self.high})")

    @classmethod
    def of(cls, counts: set[int] | frozenset[int]) -> "RowRange":
        """Return the range of exactly ``counts``, which need not be consecutive."""
        if not counts:
            raise ValueError("invalid row counts: need at least one")
        low, high = min(counts), max(counts)
        consecutive = len(counts) == high - low + 1
        return cls(low, high, None if consecutive else frozenset(counts))

    def padded(self, size: int) -> int:
        """Return the smallest count of the range that is at least ``size``, for ``size`` up to ``high``."""
        if self.counts is None:
            return max(size, self.low)
        return min(count for count in self.counts if count >= size)

    def describe(self) -> str:
        """Return the counts as text, such as "2 to 32" or "4 to 6, 10 to 12"."""
        if self.counts is None:
            return f"{self.low} to {'any number' if self.high is None else self.high}"
        runs: list[list[int]] = []
        for count in sorted(self.counts):
            if runs and runs[-1][1] == count - 1:
                runs[-1][1] = count
            else:
                runs.append([count, count])
        return ", ".join(str(first) if first == last else f"{first} to {last}" for first, last in runs)


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
_rows: contextvars.ContextVar[RowRange | None] = contextvars.ContextVar("saguaro_linear_rows", default=None)


@contextlib.contextmanager
def attention_plan(segments: Sequence[Segment]) -> Iterator[None]:
    """Run model forwards in this block with row-by-row attention over ``segments``."""
    token = _plan.set(segments)
    try:
        yield
    finally:
        _plan.reset(token)


@contextlib.contextmanager
def linear_rows(rows: RowRange | None) -> Iterator[None]:
    """Run the linear layers of installed models in this block with row counts inside ``rows`` (None: as they come)."""
    token = _rows.set(rows)
    try:
        yield
    finally:
        _rows.reset(token)


def split_rows(count: int, rows: RowRange) -> list[int]:
    """Return chunk sizes that cover ``count`` rows, each at most ``rows.high``, as even as possible.

    The caller pads a chunk whose size is not a count of ``rows`` to ``rows.padded(size)``.
    """
    if count <= 0:
        return []
    if rows.high is None or count <= rows.high:
        return [count]
    chunks = -(-count // rows.high)
    base, extra = divmod(count, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: RowRange) -> torch.Tensor:
    """Return ``linear(x, weight, bias)`` computed in matmuls whose row counts lie in ``rows``.

    The leading dimensions of ``x`` are flattened into rows. More than
    ``rows.high`` are split into chunks. A chunk whose size is not a count of
    ``rows`` is padded to the next one with copies of its last row, whose
    results are dropped. Each chunk is made
    contiguous, because kernels round a transposed input (as attention outputs
    may be) differently.
    """
    flat = x.reshape(-1, x.shape[-1])
    outputs = []
    start = 0
    for size in split_rows(flat.shape[0], rows):
        chunk = flat[start : start + size]
        start += size
        padded = rows.padded(size)
        if padded > size:
            chunk = torch.cat([chunk, chunk[-1:].expand(padded - size, -1)])
        chunk = chunk.contiguous()
        outputs.append(torch.nn.functional.linear(chunk, weight, bias)[:size])
    result = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return result.reshape(*x.shape[:-1], weight.shape[0])


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = _rows.get()
    if rows is None:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return invariant_linear(x, module.weight, module.bias, rows)


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
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(_linear_forward, module)


def _order_probe(out_features: int, in_features: int, dtype: torch.dtype, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a weight and inputs whose products reveal the order in which a kernel sums them.

    Every weight is +-1 except one +L and one -L per output, with L = 2^24, and
    every input is +-1. Where the two large products cancel (for about half of
    the outputs), a partial sum that contains L absorbs a 1 added to it, so the
    result counts the ones summed outside the partial sums that contain L.
    Kernels that split or order the sum differently then give different
    integers, where random data would round to the same bits in all but a few
    of many thousand outputs.
    """
    weight = torch.randint(0, 2, (out_features, in_features), generator=generator).float() * 2 - 1
    large = float(2**24)
    first = torch.randint(0, in_features, (out_features,), generator=generator)
    second = (first + 1 + torch.randint(0, max(in_features - 1, 1), (out_features,), generator=generator)) % in_features
    rows_index = torch.arange(out_features)
    weight[rows_index, first] = large
    weight[rows_index, second] = -large
    inputs = torch.randint(0, 2, (rows, in_features), generator=generator).float() * 2 - 1
    return weight.to(dtype), inputs.to(dtype)


def _results_by_count(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, count: int) -> torch.Tensor:
    """Return ``linear(x)`` computed in forwards of exactly ``count`` rows (the last window overlaps the one before)."""
    total = x.shape[0]
    outputs = []
    for start in range(0, total, count):
        begin = min(start, total - count)
        outputs.append(torch.nn.functional.linear(x[begin : begin + count].contiguous(), weight, bias)[start - begin :])
    return torch.cat(outputs)


@torch.inference_mode()
def row_classes(model, max_rows: int = PROBE_MAX_ROWS, max_features: int | None = PROBE_MAX_FEATURES) -> dict[int, tuple[int | None, ...]]:
    """Return, for each row count from 1 to ``max_rows``, the class of that count in each distinct linear layer of ``model``.

    For each distinct layer shape, dtype and bias the probe computes
    ``max_rows`` input rows in forwards of every count from 1 to ``max_rows``
    rows, so each row sits at many positions among different neighbours. Its
    weight and inputs (``_order_probe``) have the layer's shape, up to
    ``max_features`` outputs (None: all of them). Two counts belong to one class when every
    result is the same bits, and class indices count up from 0 in the order
    the counts first appear. A count at which reversing the rows of each
    forward changes a result belongs to no class (None). The classes are valid
    for the current torch thread count.
    """
    layers = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            layers.setdefault((module.in_features, module.out_features, module.weight.dtype, module.bias is not None), module)
    generator = torch.Generator().manual_seed(0)
    counts = range(1, max_rows + 1)
    # classes[c]: per layer, the index of the class of count c, or None where a row's position changes it.
    classes: dict[int, list[int | None]] = {count: [] for count in counts}
    for (in_features, out_features, dtype, _), layer in layers.items():
        device = layer.weight.device
        features = out_features if max_features is None else min(out_features, max_features)
        weight, x = _order_probe(features, in_features, dtype, max_rows, generator)
        weight, x = weight.to(device), x.to(device)
        bias = None if layer.bias is None else layer.bias[:features]
        seen: list[torch.Tensor] = []
        for count in counts:
            result = _results_by_count(x, weight, bias, count)
            if not torch.equal(result, _results_by_count(x.flip(0), weight, bias, count).flip(0)):
                classes[count].append(None)
                continue
            index = next((i for i, other in enumerate(seen) if torch.equal(result, other)), None)
            if index is None:
                seen.append(result)
                index = len(seen) - 1
            classes[count].append(index)
    return {count: tuple(layer_classes) for count, layer_classes in classes.items()}


def invariant_rows(model, max_rows: int = PROBE_MAX_ROWS) -> RowRange | None:
    """Return the largest set of row counts at which every linear layer of ``model`` computes a row alike, or None.

    See ``largest_class``. None means that no count qualifies. The probe
    covers every output feature when torch runs more than one thread (see
    ``PROBE_MAX_FEATURES``).
    """
    max_features = PROBE_MAX_FEATURES if torch.get_num_threads() == 1 else None
    return largest_class(row_classes(model, max_rows, max_features))


def largest_class(classes: dict[int, tuple[int | None, ...]]) -> RowRange | None:
    """Return the counts of the class of ``classes`` (from ``row_classes``) with the most counts, or None.

    A class is one class index per layer, so its counts give the same bits in
    every layer. On a tie the class with the lowest count wins, because it
    pads small forwards least. Its counts need not be consecutive.
    """
    members: dict[tuple[int | None, ...], set[int]] = {}
    for count in sorted(classes):
        if None not in classes[count]:
            members.setdefault(classes[count], set()).add(count)
    if not members:
        return None
    best = max(members.values(), key=lambda counts: (len(counts), -min(counts)))
    return RowRange.of(best)
