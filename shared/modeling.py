"""Model loading and device placement for the verify and draft services."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("saguaro.modeling")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_cpu_list(text: str) -> set[int]:
    """Parse a CPU list such as ``0``, ``0-3`` or ``0,2,4-5``."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first, last = part.split("-", 1)
            cpus.update(range(int(first), int(last) + 1))
        else:
            cpus.add(int(part))
    return cpus


def place_process(device: str, threads: int, cpus: str) -> torch.device:
    """Pin this process to ``cpus`` (if given), set torch's thread count and return the device."""
    if cpus:
        wanted = parse_cpu_list(cpus)
        available = os.sched_getaffinity(0)
        usable = wanted & available
        if not usable:
            raise ValueError(f"none of the CPUs {sorted(wanted)} is available to this process (available: {sorted(available)})")
        os.sched_setaffinity(0, usable)
        logger.info("pinned to CPUs %s", sorted(usable))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        # Raised when inter-op work has already started in this process; the default then stays.
        logger.debug("could not set the inter-op thread count")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available in this build of torch")
        torch.cuda.set_device(dev)
    return dev


def require_model_dir(path: str) -> Path:
    """Return ``path`` as a Path; raise FileNotFoundError with the fix if it contains no model config."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {directory} has no config.json; build the default models with "
            f"`saguaro-models` (or `make models`) or point the setting at a Hugging Face model directory"
        )
    return directory


def cpu_has_native_matmul(dtype: str) -> bool:
    """Return whether torch's CPU kernels have native instructions for ``dtype`` matmuls (AVX512-BF16, AMX or AVX512-FP16).

    Without them, torch 2.13 computes bf16 and fp16 matmuls at a fixed rate per
    row: on an AVX2-only AMD EPYC, a 5-token bf16 forward of Qwen2.5-Coder-1.5B
    took 4.0 times a one-token forward (fp32: 2.9 times).
    """
    check = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}.get(dtype)
    if check is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        # Private torch API: when it is gone, assume the kernels are native rather than warn wrongly.
        return True


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """Return the dtype that setting ``dtype`` means on ``device``: ``auto`` becomes bfloat16 or float32.

    On a CPU without native bf16 matmuls float32 is faster at every forward
    size (AVX2-only AMD EPYC, Qwen2.5-Coder-1.5B, one thread: 300 against 333 ms
    for one token, 857 against 1322 ms for five).
    """
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_matmul("bfloat16") else "float32"


def load_causal_lm(path: str, dtype: str, device: torch.device):
    """Load a Hugging Face causal LM directory for inference in ``dtype`` (a setting value, ``auto`` included); raise a clear error if it is missing."""
    from transformers import AutoModelForCausalLM

    directory = require_model_dir(path)
    if dtype == "auto":
        dtype = resolve_dtype(dtype, device)
        logger.info("dtype auto: loading %s in %s on %s", directory.name, dtype, device)
    if device.type == "cpu" and not cpu_has_native_matmul(dtype):
        logger.warning(
            "this CPU has no native %s matmul instructions, so each token of a forward costs nearly as much as a one-token "
            "forward and verifying drafts can cost more than it saves; set SAGUARO_DTYPE=float32 (or auto) or use a CPU with AVX512-BF16 or AMX",
            dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype], attn_implementation="sdpa", use_kernels=False)
    model.to(device)
    model.eval()
    return model


def quantize_int8(model):
    """Replace the model's linear layers by dynamically quantized int8 ones (CPU only).

    Decoding one token on a CPU is bound by reading the weights; int8 weights
    are a quarter of fp32 and half of bf16. Activations stay fp32.
    """
    import warnings

    from torch.ao.quantization import quantize_dynamic

    # NOTE: torch 2.13 marks torch.ao quantization deprecated (torchao replaces it) and warns on
    # every quantized forward; it still works, and the warning is silenced here.
    warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*", category=DeprecationWarning)
    model = model.float()
    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_model_dir(path))


def eos_token_ids(model, tokenizer) -> set[int]:
    """Return every end-of-sequence id the generation config or tokenizer declares."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids}


def crop_cache(cache, length: int) -> None:
    """Shrink a transformers ``Cache`` to its first ``length`` tokens (no-op if it is not longer)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        # transformers 5: a negative argument removes that many tokens from the end.
        cache.crop(-excess)


def tokenizer_fingerprint(tokenizer) -> str:
    """Return a sha256 of the token string -> id map and the special tokens.

    Two tokenizers with the same fingerprint encode and decode every text the same way.
    """
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()
