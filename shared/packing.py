"""One model forward for several sequences that each keep their own KV cache.

``PackedBatch`` concatenates the per-sequence ``DynamicCache`` objects along
the sequence axis into one batch-1 cache. It runs the new tokens of every
sequence as one query row set with explicit positions, under a block-diagonal
additive 4D mask, so each sequence attends only to its own tokens. Decoding on
a CPU is bound by reading the weights, so one forward over 8 sequences x 5
tokens costs far less than 8 forwards of 5 tokens.

NOTE: only run on CPU so far. In bf16 the packed logits differ from separate
forwards by rounding (other matmul shapes, other attention blocks), which can
flip near-tied argmaxes, unless ``forward`` runs with ``batch_invariant`` on a
model that uses ``shared.row_attention``.

Relies on transformers 5 internals: ``DynamicLayer.keys``/``.values`` of shape
[batch, kv_heads, seq, head_dim], ``DynamicLayer.lazy_initialization``, a 4D
``attention_mask`` being passed through to attention unchanged, and a 1D
tensor ``logits_to_keep`` selecting query rows before the LM head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from shared import row_attention


def _check_layers(cache: DynamicCache, what: str) -> None:
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.is_sliding:
            raise ValueError(
                f"{what} has a {type(layer).__name__} layer, but packing supports only full-attention DynamicLayer caches "
                "because a sliding window would drop tokens of other sequences"
            )


class PackedBatch:
    """Several sequences' KV caches concatenated into one batch-1 cache for shared forwards.

    Sequence ``i`` is the i-th cache given to the constructor. Every token in the
    packed cache belongs to one sequence. A sequence's tokens are its original
    cache followed by the tokens appended for it by ``forward``, in the order
    they were added. The packed cache stores them in that same order.
    """

    def __init__(self, model, caches: list[DynamicCache]):
        """Copy ``caches`` into one packed cache, leaving the given caches unchanged."""
        if not caches:
            raise ValueError("PackedBatch needs at least one cache")
        parameter = next(model.parameters())
        self.model = model
        self.device = parameter.device
        self.dtype = parameter.dtype
        self.vocab_size = model.config.vocab_size

        self.cache = DynamicCache(config=model.config)
        _check_layers(self.cache, "the model's cache")
        num_layers = len(self.cache.layers)
        for i, cache in enumerate(caches):
            _check_layers(cache, f"cache {i}")
            if len(cache.layers) != num_layers:
                raise ValueError(f"cache {i} has {len(cache.layers)} layers but the model has {num_layers}")

        self.original_lengths = [cache.get_seq_length() for cache in caches]
        with torch.inference_mode():
            self._concatenate(caches)
            # owner[t]: the sequence that packed token t belongs to.
            self._owner = torch.repeat_interleave(
                torch.arange(len(caches), device=self.device),
                torch.tensor(self.original_lengths, device=self.device),
            )
        self._initial_length = int(self._owner.numel())

    def _concatenate(self, caches: list[DynamicCache]) -> None:
        filled = [cache for cache, length in zip(caches, self.original_lengths) if length > 0]
        if not filled:
            return  # The packed layers initialize themselves on the first forward.
        for layer_idx, layer in enumerate(self.cache.layers):
            keys = torch.cat([cache.layers[layer_idx].keys for cache in filled], dim=-2).to(self.device)
            values = torch.cat([cache.layers[layer_idx].values for cache in filled], dim=-2).to(self.device)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values

    # -- bookkeeping ----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.original_lengths)

    @property
    def packed_length(self) -> int:
        """Tokens in the packed cache, over all sequences."""
        return int(self._owner.numel())

    def sequence_length(self, i: int) -> int:
        """Tokens of sequence ``i`` in the packed cache: its original cache plus the tokens appended for it."""
        return int((self._owner == i).sum())

    def appended_count(self, i: int) -> int:
        """Tokens appended for sequence ``i`` by ``forward`` and not cropped since."""
        return self.sequence_length(i) - self.original_lengths[i]

    def _packed_indices(self, i: int) -> torch.Tensor:
        """Return the packed-cache indices of sequence ``i``'s tokens in the order they were added."""
        return torch.nonzero(self._owner == i).squeeze(1)

    def _appended_indices(self, i: int) -> torch.Tensor:
        """Return the packed-cache indices of the tokens appended for sequence ``i``, in the order they were added."""
        return self._packed_indices(i)[self.original_lengths[i] :]

    # -- forward --------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: list[list[int]],
        positions: list[list[int]],
        allowed: list[torch.Tensor | None] | None = None,
        logits_to_keep: int | list[int] | None = None,
        batch_invariant: bool = False,
    ) -> list[torch.Tensor]:
        """Run one model forward over every sequence's new tokens; return each sequence's logits.

        ``tokens[i]`` (possibly empty) are appended to sequence ``i`` at the absolute
        positions ``positions[i]``. By default a new token of sequence ``i`` attends
        to every token of sequence ``i`` already in the packed cache and causally to
        its new tokens. ``allowed[i]``, if given, replaces that rule for sequence
        ``i``: a bool tensor [n_i, prev_i + n_i] whose columns are the sequence's
        tokens in the order they were added (prev_i tokens in the packed cache
        before this call, then the n_i new ones). ``logits_to_keep`` limits the
        returned rows to the last k of each sequence (an int for all, or one per
        sequence); None returns [n_i, V] for every sequence.

        ``batch_invariant`` runs attention row by row (``shared.row_attention``,
        which the model must have installed), so each sequence's logits equal those
        of its own forward. It supports the default causal rule only. The caller runs
        the forward under ``row_attention.linear_rows``, because matmuls over other
        row counts round differently.
        """
        count = len(self)
        if len(tokens) != count or len(positions) != count:
            raise ValueError(f"expected tokens and positions for {count} sequences, got {len(tokens)} and {len(positions)}")
        if allowed is not None and len(allowed) != count:
            raise ValueError(f"expected {count} allowed masks (None for the default), got {len(allowed)}")
        new_counts = [len(t) for t in tokens]
        for i, (seq_tokens, seq_positions) in enumerate(zip(tokens, positions)):
            if len(seq_positions) != len(seq_tokens):
                raise ValueError(f"sequence {i} has {len(seq_tokens)} tokens but {len(seq_positions)} positions")
        kept_counts = self._kept_counts(new_counts, logits_to_keep)
        if batch_invariant and allowed is not None and any(a is not None for a in allowed):
            raise ValueError("batch_invariant supports only the default causal rule; pass allowed=None")

        total_new = sum(new_counts)
        if total_new == 0:
            return [torch.empty(0, self.vocab_size, dtype=self.dtype, device=self.device) for _ in range(count)]

        new_owner = torch.repeat_interleave(torch.arange(count, device=self.device), torch.tensor(new_counts, device=self.device))
        mask = self._mask(new_owner, new_counts, allowed)
        input_ids = torch.tensor([[t for seq_tokens in tokens for t in seq_tokens]], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[p for seq_positions in positions for p in seq_positions]], dtype=torch.long, device=self.device)
        rows = 0 if logits_to_keep is None else self._kept_rows(new_counts, kept_counts)

        plan = contextlib.nullcontext()
        if batch_invariant:
            plan = row_attention.attention_plan(self._segments(new_owner, new_counts))
        with plan:
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=rows,
            )
        self._owner = torch.cat([self._owner, new_owner])
        return list(out.logits[0].split(kept_counts))

    def _segments(self, new_owner: torch.Tensor, new_counts: list[int]) -> list[row_attention.Segment]:
        """Return each sequence's query rows and key columns for row attention over this forward."""
        kv_owner = torch.cat([self._owner, new_owner])
        segments = []
        row_start = 0
        for i, count in enumerate(new_counts):
            if count:
                columns = torch.nonzero(kv_owner == i).squeeze(1)
                prefix = int(columns.numel()) - count
                segments.append(row_attention.Segment(row_start, row_start + count, prefix=prefix, columns=columns))
            row_start += count
        return segments

    def _kept_counts(self, new_counts: list[int], logits_to_keep: int | list[int] | None) -> list[int]:
        if logits_to_keep is None:
            return list(new_counts)
        if isinstance(logits_to_keep, int):
            logits_to_keep = [logits_to_keep] * len(new_counts)
        if len(logits_to_keep) != len(new_counts):
            raise ValueError(f"expected logits_to_keep for {len(new_counts)} sequences, got {len(logits_to_keep)}")
        if any(k < 0 for k in logits_to_keep):
            raise ValueError(f"invalid logits_to_keep {logits_to_keep}: counts must be >= 0")
        return [min(k, n) for k, n in zip(logits_to_keep, new_counts)]

    def _kept_rows(self, new_counts: list[int], kept_counts: list[int]) -> torch.Tensor:
        """Return the query rows of the last ``kept_counts[i]`` new tokens of every sequence."""
        ends = torch.tensor(new_counts, device=self.device).cumsum(0)
        kept = torch.tensor(kept_counts, device=self.device)
        # Row r of sequence i's kept block is ends[i] - kept[i] + r.
        starts = torch.repeat_interleave(ends - kept, kept)
        block_starts = torch.repeat_interleave(kept.cumsum(0) - kept, kept)
        return starts + torch.arange(int(kept.sum()), device=self.device) - block_starts

    def _mask(self, new_owner: torch.Tensor, new_counts: list[int], allowed: list[torch.Tensor | None] | None) -> torch.Tensor:
        """Return the additive mask [1, 1, Q, packed_length + Q] for the new tokens of this forward."""
        prev_length = self.packed_length
        total_new = int(new_owner.numel())
        kv_owner = torch.cat([self._owner, new_owner])
        kv_index = torch.arange(prev_length + total_new, device=self.device)
        query_index = prev_length + torch.arange(total_new, device=self.device)
        # Default: the sequence's own tokens, up to and including the query itself.
        permitted = (new_owner[:, None] == kv_owner[None, :]) & (kv_index[None, :] <= query_index[:, None])

        if allowed is not None:
            row_start = 0
            for i, seq_allowed in enumerate(allowed):
                rows = new_counts[i]
                if seq_allowed is not None:
                    columns = torch.nonzero(kv_owner == i).squeeze(1)
                    if seq_allowed.dtype != torch.bool or tuple(seq_allowed.shape) != (rows, int(columns.numel())):
                        raise ValueError(
                            f"allowed[{i}] must be a bool tensor of shape ({rows}, {int(columns.numel())}), "
                            f"got {seq_allowed.dtype} {tuple(seq_allowed.shape)}"
                        )
                    # Other sequences' columns are already False in these rows.
                    permitted[row_start : row_start + rows, columns] = seq_allowed.to(self.device)
                row_start += rows

        mask = torch.zeros(permitted.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~permitted, torch.finfo(self.dtype).min)
        return mask[None, None]

    # -- write-back and discard --------------------------------------------------

    @torch.inference_mode()
    def append_to(self, i: int, cache: DynamicCache, indices: slice | Sequence[int] | torch.Tensor | None = None) -> None:
        """Append to ``cache`` the KV of tokens appended for sequence ``i``, in every layer.

        ``indices`` selects among the tokens appended for sequence ``i`` by
        ``forward``, numbered 0.. in the order they were added (``slice(0, m)`` is
        the first m); None selects all of them. ``cache`` is usually sequence
        ``i``'s own cache, unchanged since the batch was built, so that the
        appended KV lands right after the tokens it was computed against.
        """
        _check_layers(cache, "the destination cache")
        if len(cache.layers) != len(self.cache.layers):
            raise ValueError(f"the destination cache has {len(cache.layers)} layers but the packed cache has {len(self.cache.layers)}")
        appended = self._appended_indices(i)
        if indices is not None:
            if isinstance(indices, slice):
                appended = appended[indices]
            else:
                appended = appended[torch.as_tensor(indices, dtype=torch.long, device=self.device)]
        if appended.numel() == 0:
            return
        for source, destination in zip(self.cache.layers, cache.layers):
            destination.update(source.keys.index_select(-2, appended), source.values.index_select(-2, appended))

    def appended_layers(self, i: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return per layer copies of the keys and values of the tokens appended for sequence ``i``, from its ``start``-th on."""
        appended = self._appended_indices(i)[start:]
        return [(layer.keys.index_select(-2, appended), layer.values.index_select(-2, appended)) for layer in self.cache.layers]

    def crop(self, length: int) -> None:
        """Drop every token after the first ``length`` tokens of the packed cache, for all sequences.

        Use ``packed_length`` before a forward as ``length`` to discard what that
        forward and later ones appended (e.g. tree tokens). The original caches'
        tokens cannot be dropped.
        """
        if length < self._initial_length:
            raise ValueError(f"invalid length {length}: the packed cache starts with {self._initial_length} tokens from the given caches")
        excess = self.packed_length - length
        if excess > 0:
            self.cache.crop(-excess)
            self._owner = self._owner[:length]
