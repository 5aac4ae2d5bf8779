"""Tiny random-weight models with a word-level tokenizer, for fast tests of mechanics and exactness.

Token i < 126 is the word ``w{i}``; 126 is ``<s>`` and 127 is ``</s>`` (EOS).
The draft is the target with noise added to its weights, so it agrees with the
target often but not always: both cache hits and misses occur.

The saved pair uses the Llama architecture: transformers 5 loads a Qwen2
checkpoint's tokenizer as Qwen2Tokenizer (byte-level BPE), which cannot carry
the word-level test vocabulary, while for Llama it keeps the saved tokenizer.
In-process tests use Qwen2, the architecture of the default models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

TINY_VOCAB = 128
EOS_ID = 127
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tiny_qwen2(seed: int, layers: int = 2, hidden: int = 64, vocab: int = TINY_VOCAB, arch: str = "qwen2"):
    """Return a random Qwen2 (or Llama) model in fp32; the same seed gives the same weights."""
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    config = config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID - 1,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    # Sharpen the output distribution so greedy continuations vary and rarely tie.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.eval()
    return model


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(TINY_VOCAB - 2)}
    vocab["<s>"] = TINY_VOCAB - 2
    vocab["</s>"] = EOS_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_pair(directory: Path, draft_noise: float = 0.02) -> tuple[Path, Path]:
    """Write a target and a draft model directory under ``directory``; return their paths."""
    target_dir, draft_dir = directory / "tiny-target", directory / "tiny-draft"
    target = tiny_qwen2(seed=11, arch="llama")
    draft = tiny_qwen2(seed=11, arch="llama")
    generator = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * draft_noise * param.std())
    tokenizer = tiny_tokenizer()
    for model, path in ((target, target_dir), (draft, draft_dir)):
        model.generation_config.eos_token_id = EOS_ID
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return target_dir, draft_dir


def target_greedy(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Return the target-only greedy continuation of each prompt, decoded in this process without a KV cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False)
    outputs = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(max_tokens):
                ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
        outputs.append(ids[len(prompt):])
    return outputs


def target_greedy_one_token(model_dir: Path, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype) -> list[list[int]]:
    """Return the greedy continuations the verify engine gives with one token per forward, in ``dtype``.

    In bf16 this is the reference for the services' greedy output, because a
    no-cache forward over the whole sequence rounds differently.
    """
    from transformers import AutoModelForCausalLM

    from services.verify.engine import TargetEngine

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_kernels=False)
    engine = TargetEngine(model.eval(), torch.device("cpu"))
    outputs = []
    for index, prompt in enumerate(prompts):
        tokens, _ = decode_one_token_steps(engine, engine.prefill(f"reference{index}", list(prompt)), max_tokens)
        outputs.append(tokens)
    return outputs


def decode_one_token_steps(engine, seq, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Decode ``seq`` greedily with ``engine`` (a TargetEngine), one token per forward; return the tokens and each step's logits row."""
    tokens, rows = [], []
    for _ in range(steps):
        logits = engine.forward_batch([seq], [[seq.root]])[0]
        rows.append(logits[0])
        seq.ids.append(seq.root)
        seq.root = int(logits[0].argmax())
        tokens.append(seq.root)
    return tokens, rows


def tiny_stack_env(target_dir: Path, draft_dir: Path, namespace: str, mode: str = "ssd", **settings) -> dict[str, str]:
    """Return the SAGUARO_* environment that serves the tiny pair in fp32; ``settings`` adds fields, e.g. ``max_num_seqs=1``."""
    return {
        "SAGUARO_NAMESPACE": namespace,
        "SAGUARO_TARGET_MODEL": str(target_dir),
        "SAGUARO_DRAFT_MODEL": str(draft_dir),
        "SAGUARO_DTYPE": "float32",
        "SAGUARO_DRAFT_QUANTIZATION": "none",
        "SAGUARO_MODE": mode,
        "SAGUARO_NUM_SPECULATIVE_TOKENS": "3",
        # Tiny models make the batch-size back-off pause speculation; tests exercise the speculative paths.
        "SAGUARO_SPECULATION_BACKOFF": "false",
        **{f"SAGUARO_{name.upper()}": str(value) for name, value in settings.items()},
    }
