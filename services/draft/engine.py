"""Draft model runner: per-request KV, greedy drafting and the speculation-cache build.

Building the cache for the step that verifies ``[r, s1..sK]`` runs four steps,
one function each. Glue is one causal forward over the K + 1 tokens under
verification. Fork picks the top ``f_j`` draft candidates for the committed
token after j accepted drafts. Tree runs K batched forwards that decode every
branch at once over one shared KV with a tree attention mask. Publish, done by
the caller, writes the entries to Redis.

After a hit the next glue is short: the cache entry that hit contains the
tokens [c, t1..tK] that the next step verifies, and the tree already computed
the KV and candidates of c..t_{K-1}. A build keeps its tree KV (``TreeCache``)
until the next ``sync``, which copies the hit branch's rows into the sequence
and runs only t_K. Without this, glue ran K + 1 tokens after every hit.

``build_cache_batch`` runs glue and tree for the steps of several sequences
at once: one packed forward for all glue tokens and one per tree depth for all
branches (see ``shared.packing``), so the weights are read once per forward
instead of once per sequence.

Positions: the committed sequence before r has ``base_len`` tokens, so r sits
at position ``base_len`` and s_i at ``base_len + i``. Branch (j, c) continues
after s_j: its token at depth d (d = 1 for c itself) sits at position
``base_len + j + d``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from services.draft.vocab import VocabSubset
from shared.modeling import crop_cache
from shared.packing import PackedBatch
from shared.protocol import Proposal, ProposalParams
from shared.sampling import proposal_distributions, sample_proposals

# Candidates kept per processed position; bounds the fan-out of one acceptance length.
MAX_CANDIDATES = 16


@dataclass
class DraftSequence:
    """Draft-side state of one request."""

    request_id: str
    cache: DynamicCache
    # Tokens whose KV is in ``cache``, in order.
    ids: list[int] = field(default_factory=list)
    # candidates[i]: the draft's top MAX_CANDIDATES next tokens after ids[: i + 1], best first.
    candidates: list[list[int]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    # Redis keys of the speculation-cache entries published for the latest step.
    published_keys: list[str] = field(default_factory=list)
    # How drafts are sampled; None drafts the argmax.
    proposal: ProposalParams | None = None
    # The draft's logits [V] after the last token in ``ids``.
    last_logits: torch.Tensor | None = None
    # The last cache build's tree, valid until ``ids`` changes in any other way than ``sync`` reusing it.
    tree: TreeCache | None = None

    def crop(self, length: int) -> None:
        self.tree = None
        if length < len(self.ids):
            crop_cache(self.cache, length)
            del self.ids[length:]
            del self.candidates[length:]
            self.last_logits = None


@dataclass
class Branch:
    accepted: int  # j, drafts accepted before the branch
    token: int  # c, the committed token the branch starts with
    tokens: list[int] = field(default_factory=list)  # the K draft tokens decoded after c
    proposals: list[Proposal] = field(default_factory=list)  # q of each token when drafts are sampled


@dataclass
class TreeCache:
    """The tree tokens of a sequence's last cache build: their KV and candidates, kept for the next ``sync``.

    Tree row ``(d - 1) * len(branches) + b`` is branch b's token at depth d
    (c at d = 1), as in ``DraftEngine.tree_allowed``.
    """

    root_pos: int
    branches: list[Branch]
    # Per model layer: keys and values [batch, kv_heads, k * len(branches), head_dim] of the tree rows.
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    # candidates[d - 1][b]: the draft's top MAX_CANDIDATES tokens after branch b's token at depth d.
    candidates: list[list[list[int]]]


@dataclass
class CacheBuild:
    branches: list[Branch]
    # candidates[j]: every ranked candidate for acceptance length j, cached or not.
    candidates: list[list[int]]
    glue_s: float
    fork_s: float
    tree_s: float


@dataclass
class BuildJob:
    """The arguments of one ``DraftEngine.build_cache`` call, for ``build_cache_batch``."""

    seq: DraftSequence
    base_len: int
    tokens: list[int]
    fanout: list[int]
    k: int
    root_offset: int = 0


@dataclass
class DraftJob:
    """The arguments of one ``sync`` plus ``draft``, for ``draft_batch``."""

    seq: DraftSequence
    base_len: int
    tokens: list[int]
    k: int


class DraftEngine:
    def __init__(self, model, device: torch.device, vocab: VocabSubset | None = None):
        self.model = model
        self.device = device
        # The token ids the output layer scores; None means the whole vocabulary.
        self.vocab = vocab
        self.dtype = next(model.parameters()).dtype
        self.sequences: dict[str, DraftSequence] = {}

    # -- sequence management ------------------------------------------------

    def new_sequence(self, request_id: str) -> DraftSequence:
        seq = DraftSequence(request_id=request_id, cache=DynamicCache(config=self.model.config))
        self.sequences[request_id] = seq
        return seq

    def release(self, request_id: str) -> None:
        self.sequences.pop(request_id, None)

    @torch.inference_mode()
    def _forward(self, seq: DraftSequence, tokens: list[int], positions: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the draft over ``tokens`` appended to ``seq.cache``; return logits [len(tokens), V]."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=seq.cache, use_cache=True)
        return out.logits[0]

    def _extend(self, seq: DraftSequence, tokens: list[int]) -> None:
        """Append ``tokens`` to the sequence, computing their KV and next-token candidates."""
        if not tokens:
            return
        start = len(seq.ids)
        logits = self._forward(seq, tokens, list(range(start, start + len(tokens))))
        self._record(seq, tokens, logits)

    def _record(self, seq: DraftSequence, tokens: list[int], logits: torch.Tensor) -> None:
        """Append ``tokens``, whose KV is already in ``seq.cache``, with the candidates from their ``logits``."""
        top = self.top_candidates(logits)
        seq.tree = None
        seq.ids.extend(tokens)
        seq.candidates.extend(top)
        seq.last_logits = logits[-1]

    def top_candidates(self, logits: torch.Tensor) -> list[list[int]]:
        """Return the top MAX_CANDIDATES token ids of each row of ``logits``, best first."""
        return self.token_ids(torch.topk(logits.float(), MAX_CANDIDATES, dim=-1).indices).tolist()

    def choose(self, seq: DraftSequence, logits: torch.Tensor, positions: list[int], draft_indices: list[int]) -> tuple[list[int], list[Proposal]]:
        """Pick the draft token for each row of ``logits``: the argmax, or a sample of the sequence's proposal q.

        ``positions`` are the sequence positions of the tokens being chosen and
        ``draft_indices`` their index within a speculation (0 for s1).
        """
        if seq.proposal is None:
            return self.token_ids(torch.argmax(logits, dim=-1)).tolist(), []
        columns, probs = proposal_distributions(logits, seq.proposal, draft_indices)
        return sample_proposals(self.token_ids(columns), probs, seq.proposal.seed, positions)

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Map logit columns to token ids (the identity without a sub-vocabulary)."""
        return columns if self.vocab is None else self.vocab.to_token_ids(columns)

    def observe_tokens(self, tokens: list[int]) -> None:
        """Let the output layer score every token a request uses; logits kept from before a change are dropped."""
        if self.vocab is not None and self.vocab.add(self.model, tokens):
            for seq in self.sequences.values():
                seq.last_logits = None

    def prefill(self, request_id: str, prompt_ids: list[int]) -> DraftSequence:
        """Start a sequence with the KV of ``prompt_ids``."""
        seq = self.start_prefill(request_id, prompt_ids)
        self._extend(seq, prompt_ids)
        return seq

    def start_prefill(self, request_id: str, prompt_ids: list[int]) -> DraftSequence:
        """Start an empty sequence for ``prompt_ids``, which ``prefill_chunk`` then appends in parts."""
        seq = self.new_sequence(request_id)
        self.observe_tokens(prompt_ids)
        return seq

    def prefill_chunk(self, seq: DraftSequence, tokens: list[int]) -> None:
        """Append the next part of a prompt started with ``start_prefill``."""
        self._extend(seq, tokens)

    def sync(self, seq: DraftSequence, base_len: int, tokens: list[int]) -> None:
        """Make the sequence hold ``ids[:base_len] + tokens`` with KV and candidates for every token.

        Tokens already in the sequence at the right place are reused. The first
        ``base_len`` tokens must be ones the sequence has seen.
        """
        self._extend(seq, self._missing_tokens(seq, base_len, tokens))
        seq.last_used = time.monotonic()

    def _missing_tokens(self, seq: DraftSequence, base_len: int, tokens: list[int], rerun_last: bool = False) -> list[int]:
        """Crop ``seq`` to what it shares with ``ids[:base_len] + tokens``, add tree rows of the last build, and return the tokens left to run.

        With ``rerun_last`` the last token is always left to run, so that its logits are fresh.
        """
        tree = seq.tree
        keep = self._reusable_length(seq, base_len, tokens)
        if rerun_last:
            keep = min(keep, base_len + len(tokens) - 1)
        seq.crop(keep)
        self.observe_tokens(tokens)
        rest = tokens[keep - base_len :]
        reused = self._reuse_tree(seq, tree, rest[:-1])
        return rest[reused:]

    def _reuse_tree(self, seq: DraftSequence, tree: TreeCache | None, tokens: list[int]) -> int:
        """Append to ``seq`` the leading ``tokens`` that a branch of ``tree`` decoded at this place; return how many.

        The tree rows attended to ``seq.ids`` as the build left them, so they are
        valid only right after ``seq`` was cropped to the branch's start.
        """
        if tree is None or not tokens or not tree.candidates:
            return 0
        accepted = len(seq.ids) - tree.root_pos - 1
        index = next((b for b, branch in enumerate(tree.branches) if branch.accepted == accepted and branch.token == tokens[0]), None)
        if index is None:
            return 0
        branch = tree.branches[index]
        depth = len(tree.candidates)
        count = 1
        while count < min(len(tokens), depth) and tokens[count] == branch.tokens[count - 1]:
            count += 1
        rows = torch.arange(count, device=self.device) * len(tree.branches) + index
        for (keys, values), layer in zip(tree.layers, seq.cache.layers):
            layer.update(keys.index_select(-2, rows), values.index_select(-2, rows))
        seq.ids.extend(tokens[:count])
        seq.candidates.extend(tree.candidates[d][index] for d in range(count))
        seq.last_logits = None
        return count

    def _reusable_length(self, seq: DraftSequence, base_len: int, tokens: list[int]) -> int:
        """Return how many leading tokens of ``ids[:base_len] + tokens`` the sequence already contains."""
        if base_len > len(seq.ids):
            raise ValueError(f"invalid base_len {base_len}: the draft has only {len(seq.ids)} tokens of request {seq.request_id}")
        keep = base_len
        for cached, expected in zip(seq.ids[base_len:], tokens):
            if cached != expected:
                break
            keep += 1
        return keep

    # -- drafting -------------------------------------------------------------

    def draft(self, seq: DraftSequence, k: int) -> tuple[list[int], list[Proposal]]:
        """Draft ``k`` tokens after the sequence's last token (k - 1 forwards); return them and their q, if sampled."""
        if seq.proposal is not None and seq.last_logits is None:
            # Cropping dropped the logits that sampling needs; recompute them from the last token.
            last = seq.ids[-1]
            seq.crop(len(seq.ids) - 1)
            self._extend(seq, [last])
        drafted: list[int] = []
        proposals: list[Proposal] = []
        while True:
            token, qs = self._next_draft(seq, len(drafted))
            drafted.append(token)
            proposals.extend(qs)
            if len(drafted) == k:
                return drafted, proposals
            self._extend(seq, [token])

    def draft_batch(self, jobs: list[DraftJob]) -> list[tuple[list[int], list[Proposal]]]:
        """Run ``sync`` and ``draft`` for every job, sharing one packed forward per drafted position.

        One forward runs every job's missing committed tokens; each further
        forward runs one drafted token per job still drafting. The drafts equal
        those of calling ``sync`` and ``draft`` per job, up to the rounding
        differences of packed forwards (see ``shared.packing``). Raises
        ValueError before changing any sequence if two jobs are for the same
        request or a ``base_len`` is invalid.
        """
        if len(jobs) == 1:
            job = jobs[0]
            self.sync(job.seq, job.base_len, job.tokens)
            return [self.draft(job.seq, job.k)]
        self._check_distinct(jobs, "draft batch")

        missing = []
        for job in jobs:
            # Run at least the last token again, so every job has fresh logits to draft from.
            missing.append(self._missing_tokens(job.seq, job.base_len, job.tokens, rerun_last=True))
            job.seq.last_used = time.monotonic()

        batch = PackedBatch(self.model, [job.seq.cache for job in jobs])
        drafted: list[list[int]] = [[] for _ in jobs]
        proposals: list[list[Proposal]] = [[] for _ in jobs]
        inputs = missing
        while any(inputs):
            positions = [list(range(len(job.seq.ids), len(job.seq.ids) + len(tokens))) for job, tokens in zip(jobs, inputs)]
            logits = batch.forward(inputs, positions)
            next_inputs: list[list[int]] = []
            for i, job in enumerate(jobs):
                if not inputs[i]:
                    next_inputs.append([])
                    continue
                self._record(job.seq, inputs[i], logits[i])
                token, qs = self._next_draft(job.seq, len(drafted[i]))
                drafted[i].append(token)
                proposals[i].extend(qs)
                # Like ``draft``: the last draft token's KV is not computed.
                next_inputs.append([token] if len(drafted[i]) < job.k else [])
            inputs = next_inputs
        for i, job in enumerate(jobs):
            batch.append_to(i, job.seq.cache)
        return list(zip(drafted, proposals))

    def _next_draft(self, seq: DraftSequence, index: int) -> tuple[int, list[Proposal]]:
        """Return the draft token after the sequence's last token, and its q if sampled; ``index`` is its place in the speculation."""
        if seq.proposal is None:
            return seq.candidates[-1][0], []
        tokens, qs = self.choose(seq, seq.last_logits[None], [len(seq.ids)], [index])
        return tokens[0], qs

    # -- speculation cache ---------------------------------------------------

    def glue(self, seq: DraftSequence, base_len: int, tokens: list[int]) -> None:
        """Write the draft KV of the tokens under verification and their candidates."""
        self.sync(seq, base_len, tokens)

    def ranked_candidates(self, seq: DraftSequence, base_len: int, tokens: list[int]) -> list[list[int]]:
        """Return, for each acceptance length j, the draft's candidates for the committed token, best first.

        After j < K accepted drafts the target rejected s_{j+1}, so s_{j+1} is not a
        candidate; after K accepted drafts any token can be the bonus token.
        """
        k = len(tokens) - 1
        ranked = []
        for j in range(k + 1):
            rejected = tokens[j + 1] if j < k else None
            ranked.append([c for c in seq.candidates[base_len + j] if c != rejected])
        return ranked

    def fork(self, seq: DraftSequence, base_len: int, tokens: list[int], fanout: list[int]) -> list[Branch]:
        """Pick the top ``fanout[j]`` candidate committed tokens c for each acceptance length j."""
        branches = []
        for j, candidates in enumerate(self.ranked_candidates(seq, base_len, tokens)):
            count = fanout[j] if j < len(fanout) else 0
            branches.extend(Branch(accepted=j, token=c) for c in candidates[: max(0, count)])
        return branches

    def tree_allowed(self, base_len: int, cache_len: int, branches: list[Branch], depth: int) -> torch.Tensor:
        """Return which cache entries each branch attends to at tree depth ``depth``, as bool [M, cache_len + depth * M].

        Branch b attends to the committed prefix, the glue tokens r..s_{j_b} and
        its own tree tokens at cache indices ``cache_len + (d - 1) * M + b`` for d <= depth.
        """
        m = len(branches)
        allowed = torch.zeros(m, cache_len + depth * m, dtype=torch.bool)
        for b, branch in enumerate(branches):
            allowed[b, : base_len + branch.accepted + 1] = True
        rows = torch.arange(m)
        for d in range(depth):
            allowed[rows, cache_len + d * m + rows] = True
        return allowed

    def tree_mask(self, base_len: int, cache_len: int, branches: list[Branch], depth: int) -> torch.Tensor:
        """Return ``tree_allowed`` as the additive attention mask [1, 1, M, cache_len + depth * M]."""
        allowed = self.tree_allowed(base_len, cache_len, branches, depth)
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[None, None].to(self.device)

    def tree_decode(self, seq: DraftSequence, base_len: int, branches: list[Branch], k: int) -> None:
        """Decode ``k`` tokens on every branch, one batched forward per depth, and move the tree KV to ``seq.tree``."""
        if not branches:
            return
        cache_len = len(seq.ids)
        inputs = [branch.token for branch in branches]
        candidates = []
        try:
            for depth in range(1, k + 1):
                positions = [base_len + branch.accepted + depth for branch in branches]
                mask = self.tree_mask(base_len, cache_len, branches, depth)
                logits = self._forward(seq, inputs, positions, mask)
                candidates.append(self.top_candidates(logits))
                inputs, proposals = self.choose(seq, logits, [p + 1 for p in positions], [depth - 1] * len(branches))
                self._append_choices(branches, inputs, proposals)
            layers = [(layer.keys[..., cache_len:, :].clone(), layer.values[..., cache_len:, :].clone()) for layer in seq.cache.layers]
        finally:
            crop_cache(seq.cache, cache_len)
        seq.tree = TreeCache(root_pos=base_len, branches=branches, layers=layers, candidates=candidates)

    @staticmethod
    def _append_choices(branches: list[Branch], tokens: list[int], proposals: list[Proposal]) -> None:
        for b, (branch, token) in enumerate(zip(branches, tokens)):
            branch.tokens.append(token)
            if proposals:
                branch.proposals.append(proposals[b])

    def build_cache(self, seq: DraftSequence, base_len: int, tokens: list[int], fanout: list[int], k: int, root_offset: int = 0) -> CacheBuild:
        """Build the ``k``-token speculation for every likely outcome of verifying ``tokens[root_offset:]`` = [r, s1..sK]."""
        started = time.perf_counter()
        self.glue(seq, base_len, tokens)
        glued = time.perf_counter()
        root_pos = base_len + root_offset
        branches = self.fork(seq, root_pos, tokens[root_offset:], fanout)
        forked = time.perf_counter()
        self.tree_decode(seq, root_pos, branches, k)
        done = time.perf_counter()
        candidates = self.ranked_candidates(seq, root_pos, tokens[root_offset:])
        return CacheBuild(branches=branches, candidates=candidates, glue_s=glued - started, fork_s=forked - glued, tree_s=done - forked)

    # -- speculation cache of several sequences -------------------------------

    def build_cache_batch(self, jobs: list[BuildJob]) -> list[CacheBuild]:
        """Run ``build_cache`` for every job with one packed glue forward and one packed forward per tree depth.

        The builds and the sequences' state afterwards are those of calling
        ``build_cache`` on each job in turn, up to the rounding differences of
        packed forwards (see ``shared.packing``). Every build gets the batch's
        phase times. Raises ValueError before changing any sequence if the jobs
        differ in ``k``, two jobs are for the same request, or a ``base_len`` is invalid.

        NOTE: the int8 draft of ``shared.modeling.quantize_int8`` quantizes each
        forward's activations with one scale over all rows, so there packed builds
        differ from sequential ones beyond rounding (40% of branches for 8
        sequences of Qwen2.5-Coder-0.5B). Both agreed with the fp32 draft's
        tokens about as often (67% and 69%).
        """
        if not jobs:
            return []
        if len(jobs) == 1:
            job = jobs[0]
            return [self.build_cache(job.seq, job.base_len, job.tokens, job.fanout, job.k, job.root_offset)]
        self._check_batch(jobs)

        started = time.perf_counter()
        batch = self._glue_batch(jobs)
        glued = time.perf_counter()
        roots = [job.tokens[job.root_offset :] for job in jobs]
        root_positions = [job.base_len + job.root_offset for job in jobs]
        branches = [self.fork(job.seq, root_pos, root, job.fanout) for job, root_pos, root in zip(jobs, root_positions, roots)]
        forked = time.perf_counter()
        self._tree_decode_batch(batch, jobs, root_positions, branches)
        done = time.perf_counter()

        builds = []
        for job, root_pos, root, seq_branches in zip(jobs, root_positions, roots, branches):
            candidates = self.ranked_candidates(job.seq, root_pos, root)
            builds.append(CacheBuild(branches=seq_branches, candidates=candidates, glue_s=glued - started, fork_s=forked - glued, tree_s=done - forked))
        return builds

    def _check_batch(self, jobs: list[BuildJob]) -> None:
        distinct_k = sorted({job.k for job in jobs})
        if len(distinct_k) > 1:
            raise ValueError(f"jobs of one cache-build batch must share k, got k = {distinct_k}; build each k in its own batch")
        self._check_distinct(jobs, "cache-build batch")

    def _check_distinct(self, jobs: list[BuildJob] | list[DraftJob], batch_name: str) -> None:
        """Raise ValueError if two jobs are for the same request or a job's ``base_len`` is invalid."""
        seen: set[str] = set()
        for job in jobs:
            if job.seq.request_id in seen:
                raise ValueError(f"request {job.seq.request_id} appears twice in one {batch_name}")
            seen.add(job.seq.request_id)
            self._reusable_length(job.seq, job.base_len, job.tokens)

    def _glue_batch(self, jobs: list[BuildJob]) -> PackedBatch:
        """Sync every job's sequence as ``glue`` does, running all missing tokens in one packed forward.

        Writes the glue KV back into each sequence's own cache and returns the
        batch, whose packed cache also contains it, for the tree forwards.
        """
        missing = [self._missing_tokens(job.seq, job.base_len, job.tokens) for job in jobs]

        batch = PackedBatch(self.model, [job.seq.cache for job in jobs])
        positions = [list(range(len(job.seq.ids), len(job.seq.ids) + len(tokens))) for job, tokens in zip(jobs, missing)]
        logits = batch.forward(missing, positions)
        for i, (job, tokens) in enumerate(zip(jobs, missing)):
            if tokens:
                batch.append_to(i, job.seq.cache)
                self._record(job.seq, tokens, logits[i])
            job.seq.last_used = time.monotonic()
        return batch

    def _tree_decode_batch(self, batch: PackedBatch, jobs: list[BuildJob], root_positions: list[int], branches: list[list[Branch]]) -> None:
        """Decode ``k`` tokens on every job's branches, one packed forward per depth.

        The tree KV goes only into ``batch``'s packed cache, never into the
        sequences' caches. Each job's part of it is copied to its ``seq.tree``.
        """
        if not any(branches):
            return
        cache_lens = [len(job.seq.ids) for job in jobs]
        glue_counts = [batch.appended_count(i) for i in range(len(jobs))]
        candidates: list[list[list[list[int]]]] = [[] for _ in jobs]
        inputs = [[branch.token for branch in seq_branches] for seq_branches in branches]
        for depth in range(1, jobs[0].k + 1):
            positions = [[root_pos + branch.accepted + depth for branch in seq_branches] for root_pos, seq_branches in zip(root_positions, branches)]
            allowed = [
                self.tree_allowed(root_pos, cache_len, seq_branches, depth) if seq_branches else None
                for root_pos, cache_len, seq_branches in zip(root_positions, cache_lens, branches)
            ]
            logits = batch.forward(inputs, positions, allowed=allowed)
            for i, job in enumerate(jobs):
                if not branches[i]:
                    continue
                next_positions = [p + 1 for p in positions[i]]
                candidates[i].append(self.top_candidates(logits[i]))
                inputs[i], proposals = self.choose(job.seq, logits[i], next_positions, [depth - 1] * len(branches[i]))
                self._append_choices(branches[i], inputs[i], proposals)
        for i, (job, root_pos) in enumerate(zip(jobs, root_positions)):
            if branches[i]:
                layers = batch.appended_layers(i, glue_counts[i])
                job.seq.tree = TreeCache(root_pos=root_pos, branches=branches[i], layers=layers, candidates=candidates[i])
