"""A sub-vocabulary output layer for the draft.

At the draft's tree width the output layer is the largest single cost of a
forward: on Qwen2.5-Coder-0.5B with int8 weights on one CPU core it took 90 ms of
a 520 ms cache build (five forwards over 5 to 8 tokens), because it has 151,936
rows (``python -m bench.draft_speed`` on a 2-core Xeon VM, one thread). The draft only
proposes tokens, so it can score a subset. The subset starts with the first
``size`` token ids and the special tokens. Byte-level BPE vocabularies number
tokens in merge order, so low ids are the common ones. Every token seen in a
prompt or committed so far joins the subset. Tokens that join later are scored
by a small unquantized side layer next to the main one. Rebuilding and
quantizing the main layer took 0.92 s per new token, a stall on the critical
path, and the side layer takes 0.2 ms (32,768 rows of Qwen2.5-Coder-0.5B, one
core of a 2-core Xeon VM, ``python -m bench.draft_vocab_growth``). Output stays exact: the verifier
checks every draft, and under rejection acceptance the q it tests is the
distribution over the subset that the draft sampled from.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("saguaro.draft")

# Added tokens scored by the side layer before the main layer is rebuilt to include them.
MAX_ADDED_ROWS = 4096


class SubsetHead(torch.nn.Module):
    """Output layer over a sub-vocabulary: the main layer's logits, then the side layer's for tokens added since."""

    def __init__(self, main: torch.nn.Module, added: torch.nn.Linear | None):
        super().__init__()
        self.main = main
        self.added = added

    @property
    def out_features(self) -> int:
        return self.main.out_features + (self.added.out_features if self.added is not None else 0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.main(hidden)
        if self.added is None:
            return logits
        return torch.cat([logits, self.added(hidden).to(logits.dtype)], dim=-1)


class VocabSubset:
    """The token ids the draft's output layer scores, and the layer built from them.

    ``ids[i]`` is the token id of logit column i: first the main layer's ids in
    increasing order, then the added ids in the order they joined. The full
    output weights stay in memory (``weight``) so the layers can be rebuilt
    when the subset grows.
    """

    def __init__(self, model, size: int, keep_ids: list[int], quantize: bool):
        head = model.get_output_embeddings()
        self.weight = head.weight.detach().clone()
        self.bias = None if head.bias is None else head.bias.detach().clone()
        self.vocab_size = self.weight.shape[0]
        self.quantize = quantize
        self.known = set(range(min(size, self.vocab_size))) | {i for i in keep_ids if 0 <= i < self.vocab_size}
        self.ids = torch.empty(0, dtype=torch.long)
        self.main: torch.nn.Module | None = None
        self.main_ids = torch.empty(0, dtype=torch.long)
        self.added_ids: list[int] = []
        self.install(model)

    def _linear(self, ids: torch.Tensor) -> torch.nn.Linear:
        """Return a linear layer over the output rows of ``ids``."""
        layer = torch.nn.Linear(self.weight.shape[1], len(ids), bias=self.bias is not None, dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            layer.weight.copy_(self.weight[ids.to(self.weight.device)])
            if self.bias is not None:
                layer.bias.copy_(self.bias[ids.to(self.bias.device)])
        return layer

    def install(self, model) -> None:
        """Build the main output layer over the whole current subset and put it into ``model``."""
        ids = torch.tensor(sorted(self.known), dtype=torch.long)
        layer = self._linear(ids)
        if self.quantize:
            from torch.ao.quantization import quantize_dynamic

            layer = quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)[0]
        self.main = layer
        self.main_ids = ids.to(self.weight.device)
        self.added_ids = []
        self.ids = self.main_ids
        model.set_output_embeddings(SubsetHead(self.main, None))

    def add(self, model, tokens: list[int]) -> bool:
        """Add ``tokens`` the subset lacks to the side layer, or rebuild the main layer once the side layer is full; return whether the subset changed."""
        new = sorted({t for t in tokens if t not in self.known and 0 <= t < self.vocab_size})
        if not new:
            return False
        self.known.update(new)
        if len(self.added_ids) + len(new) > MAX_ADDED_ROWS:
            self.install(model)
            logger.info("draft output layer rebuilt over %d tokens", len(self.known))
            return True
        self.added_ids.extend(new)
        added = torch.tensor(self.added_ids, dtype=torch.long)
        model.set_output_embeddings(SubsetHead(self.main, self._linear(added)))
        self.ids = torch.cat([self.main_ids, added.to(self.main_ids.device)])
        logger.debug("draft output layer now scores %d tokens (%d added)", len(self.known), len(new))
        return True

    def to_token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Map logit column indices to token ids."""
        return self.ids[columns]


def special_token_ids(tokenizer, model) -> list[int]:
    """Return the ids the draft must always be able to propose: special and added tokens, and EOS."""
    ids = set(tokenizer.all_special_ids)
    ids |= set(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    eos = getattr(model.generation_config, "eos_token_id", None) if getattr(model, "generation_config", None) else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids |= set(eos)
    return sorted(ids)
