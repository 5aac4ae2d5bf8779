"""Target model runner: prefill and one verification forward per step.

The target KV contains every committed token except the last one, r. A step runs
one forward over ``[r, s1..sK]`` and yields the committed tokens x_0..x_K for
the K + 1 positions after r (see ``shared.sampling`` for how they are drawn).
After j drafts are accepted the KV of ``r, s1..sj`` is kept and the rest dropped.

With ``batch_invariant`` (the default) every decode forward runs under row
attention (``shared.row_attention``), with its linear layers run at row counts
at which the CPU's matmul kernels round every row alike, so a position gets the
same logits in an AR step, a verification and a packed batch, in bf16 too.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from shared import row_attention
from shared.modeling import crop_cache
from shared.packing import PackedBatch
from shared.protocol import Proposal, SamplingParams
from shared.sampling import accept_prefix, logprobs_of, sample_positions, verify_with_proposals

logger = logging.getLogger("saguaro.verify")


@dataclass
class StepResult:
    accepted: int  # j, drafts accepted
    committed: list[int]  # s1..sj followed by the target's token x_j
    logprobs: list[tuple[float, dict[int, float]]] | None = None


@dataclass
class TargetSequence:
    request_id: str
    cache: DynamicCache
    # Committed tokens whose KV is in ``cache``; the sequence is ids + [root].
    ids: list[int] = field(default_factory=list)
    root: int = -1

    @property
    def length(self) -> int:
        """Committed tokens including the root."""
        return len(self.ids) + 1


@dataclass
class PrefillJob:
    """A prefill in progress: the verify loop runs one chunk between two decode steps."""

    seq: TargetSequence
    # The prompt without its last token, which becomes the root.
    body: list[int]
    root: int
    # (start, end, decoded) per chunk. Decoded chunks replay output a request already streamed, in
    # batch-invariant forwards, so their KV equals what the decode steps computed.
    chunks: list[tuple[int, int, bool]]
    next_chunk: int = 0

    @property
    def done(self) -> bool:
        return self.next_chunk >= len(self.chunks)

    @property
    def prefilled_tokens(self) -> int:
        return self.chunks[self.next_chunk - 1][1] if self.next_chunk else 0


class TargetEngine:
    def __init__(self, model, device: torch.device, prefill_chunk: int = 512, batch_invariant: bool = True):
        self.model = model
        self.device = device
        self.prefill_chunk = prefill_chunk
        self.batch_invariant = batch_invariant
        # Row counts the linear layers of decode forwards run at; None: as they come.
        self.rows: row_attention.RowRange | None = None
        if batch_invariant:
            row_attention.install(model)
            # NOTE: off the CPU the probe does not run (see shared.row_attention); two rows and up is assumed.
            rows = row_attention.invariant_rows(model) if device.type == "cpu" else row_attention.RowRange(2)
            if rows is None:
                logger.warning(
                    "batch invariance unavailable: this CPU's %s matmul kernels round a row differently at every probed row count, "
                    "so greedy output may depend on the mode and the batch; SAGUARO_BATCH_INVARIANT=false skips the row-by-row attention",
                    next(model.parameters()).dtype,
                )
            else:
                logger.info(
                    "batch invariance: decode forwards run their linear layers at %s rows, where this CPU's matmul kernels round every row alike",
                    rows.describe(),
                )
            self.rows = rows

    @torch.inference_mode()
    def _forward(self, seq: TargetSequence, tokens: list[int], start: int, logits: bool = True) -> torch.Tensor | None:
        """Run ``tokens`` at positions ``start``.. after the sequence's cache; return their logits [len, V].

        With ``logits=False`` only the KV is computed and None is returned.
        """
        count = len(tokens)
        plan = contextlib.nullcontext()
        if self.batch_invariant:
            plan = row_attention.attention_plan([row_attention.Segment(0, count, prefix=start)])
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        position_ids = torch.arange(start, start + count, device=self.device)[None]
        with plan, row_attention.linear_rows(self.rows):
            out = self.model(input_ids=input_ids, position_ids=position_ids, cache=seq.cache, use_cache=True, logits_to_keep=0 if logits else 1)
        return out.logits[0] if logits else None

    def forward_batch(self, seqs: list[TargetSequence], token_lists: list[list[int]]) -> list[torch.Tensor]:
        """Run ``token_lists[i]`` after each sequence's cache in one packed forward; return logits [len, V] per sequence.

        Like ``_forward`` for each sequence: the tokens sit at positions
        ``len(seqs[i].ids)`` onwards and every sequence's cache keeps the KV of all
        its new tokens, for the caller to crop.
        """
        if len(seqs) != len(token_lists):
            raise ValueError(f"expected one token list per sequence, got {len(token_lists)} for {len(seqs)} sequences")
        if not seqs:
            return []
        if len(seqs) == 1:
            return [self._forward(seqs[0], token_lists[0], len(seqs[0].ids))]
        batch = PackedBatch(self.model, [seq.cache for seq in seqs])
        positions = [list(range(len(seq.ids), len(seq.ids) + len(tokens))) for seq, tokens in zip(seqs, token_lists)]
        with row_attention.linear_rows(self.rows):
            logits = batch.forward(token_lists, positions, batch_invariant=self.batch_invariant)
        for i, seq in enumerate(seqs):
            batch.append_to(i, seq.cache)
        return logits

    def start_prefill(self, request_id: str, prompt_ids: list[int], prompt_len: int | None = None) -> PrefillJob:
        """Plan the prefill of ``prompt_ids`` in chunks; ``run_prefill_chunk`` computes them one at a time.

        The KV of every token but the last is computed, and the last becomes the
        root. When ``prompt_ids`` is a request's prompt followed by output it
        already streamed, ``prompt_len`` is the prompt's length. The prompt's body
        is then prefilled as for the first prefill and the tokens after it get the
        KV that decode steps gave them, so the rest of the output is the same as
        without the restart. Chunk boundaries depend only on the prompt, never on
        what else runs, because in bf16 another split rounds the KV differently.
        """
        if not prompt_ids:
            raise ValueError("cannot prefill an empty prompt")
        body = prompt_ids[:-1]
        decoded_from = len(body)
        if prompt_len is not None and self.batch_invariant:
            decoded_from = min(max(prompt_len - 1, 0), len(body))
        chunks = [(start, min(start + self.prefill_chunk, decoded_from), False) for start in range(0, decoded_from, self.prefill_chunk)]
        chunks += [(start, min(start + self.prefill_chunk, len(body)), True) for start in range(decoded_from, len(body), self.prefill_chunk)]
        seq = TargetSequence(request_id=request_id, cache=DynamicCache(config=self.model.config))
        job = PrefillJob(seq=seq, body=body, root=prompt_ids[-1], chunks=chunks)
        if job.done:  # a one-token prompt: the root alone, no KV to compute
            seq.root = job.root
        return job

    def run_prefill_chunk(self, job: PrefillJob) -> bool:
        """Compute the KV of the job's next chunk; return True once the whole prompt is prefilled."""
        if job.done:
            return True
        start, end, decoded = job.chunks[job.next_chunk]
        if decoded:
            self._forward(job.seq, job.body[start:end], start, logits=False)
        else:
            # Only the KV matters here; keep just the last position's logits.
            with torch.inference_mode():
                self.model(
                    input_ids=torch.tensor([job.body[start:end]], device=self.device),
                    position_ids=torch.arange(start, end, device=self.device)[None],
                    cache=job.seq.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        job.next_chunk += 1
        if job.done:
            job.seq.ids = list(job.body)
            job.seq.root = job.root
        return job.done

    def prefill(self, request_id: str, prompt_ids: list[int], prompt_len: int | None = None) -> TargetSequence:
        """Prefill ``prompt_ids`` in one call (see ``start_prefill``) and return the sequence."""
        job = self.start_prefill(request_id, prompt_ids, prompt_len)
        while not job.done:
            self.run_prefill_chunk(job)
        return job.seq

    def verify(self, seq: TargetSequence, drafts: list[int], params: SamplingParams, proposals: list[Proposal] | None = None) -> StepResult:
        """Verify ``drafts`` after the root; commit the accepted prefix plus one target token.

        With ``proposals`` (the q each draft was sampled from; may be empty for
        one-hot drafts) and T > 0 the rejection test runs, otherwise the coupled one.
        """
        base_len = len(seq.ids)
        logits = self._forward(seq, [seq.root] + drafts, base_len)  # [K + 1, V]
        return self.accept(seq, drafts, logits, params, proposals)

    def accept(self, seq: TargetSequence, drafts: list[int], logits: torch.Tensor, params: SamplingParams, proposals: list[Proposal] | None = None) -> StepResult:
        """Run the acceptance test on the target's ``logits`` for [root] + drafts, commit, and drop the rejected KV."""
        base_len = len(seq.ids)
        # Row i predicts the token at position base_len + 1 + i.
        positions = [base_len + 1 + i for i in range(len(drafts) + 1)]
        if proposals is not None and params.temperature > 0.0:
            accepted, committed = verify_with_proposals(logits, params, drafts, proposals, positions)
        else:
            targets = sample_positions(logits, params, positions)
            accepted = accept_prefix(targets, drafts)
            committed = drafts[:accepted] + [targets[accepted]]
        logprobs = None
        if params.logprobs is not None:
            logprobs = logprobs_of(logits[: accepted + 1], committed, params.logprobs)
        seq.ids.append(seq.root)
        seq.ids.extend(drafts[:accepted])
        crop_cache(seq.cache, len(seq.ids))
        seq.root = committed[-1]
        return StepResult(accepted=accepted, committed=committed, logprobs=logprobs)
