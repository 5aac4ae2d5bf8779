"""Time the draft's forward and its linear-layer kernels on one CPU core, by weight format.

Shows whether another weight format or kernel would make the draft's cache
build cheaper: a tree forward runs 5 to 16 rows, the SD draft 1. Two tables:

- the whole draft forward (Qwen2.5-Coder-0.5B by default, 32,768-id output
  layer as the draft service uses) over 1, 5, 8 and 16 new tokens after a
  400-token context, with int8 dynamic quantization and in bf16;
- one linear layer of the draft's shapes with each CPU kernel torch offers:
  int8 dynamic quantization (fbgemm), int8 weights with bf16 activations
  (``_weight_int8pack_mm``), int4 weights in groups of 32 with bf16
  activations (``_weight_int4pack_mm_for_cpu``), and plain bf16 and fp32.

Writes ``bench/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.run_bench import command_line, write_results

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 400
ROWS = (1, 5, 8, 16)
# (in_features, out_features) of the draft's linear layers: q/o, gate/up, down, and the output layer.
LINEAR_SHAPES = ((896, 896), (896, 4864), (4864, 896), (896, 32768))


def median_ms(function, repeats: int) -> float:
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def time_forwards(model, repeats: int) -> dict[int, float]:
    """Return the median ms of one forward over each row count in ROWS after a CONTEXT-token prefix."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(0, 30000, (1, CONTEXT)), cache=cache, use_cache=True)
    results = {}
    for rows in ROWS:
        input_ids = torch.randint(0, 30000, (1, rows))
        position_ids = torch.arange(CONTEXT, CONTEXT + rows)[None]

        def forward():
            model(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True)
            cache.crop(-rows)

        results[rows] = median_ms(forward, repeats)
    return results


def linear_kernels(in_features: int, out_features: int) -> dict:
    """Return the linear kernels to time, each as ``name -> function(x_fp32) -> output``."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    layer = torch.nn.Linear(in_features, out_features, bias=False)
    weight = layer.weight.detach()
    dynamic = quantize_dynamic(torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8)

    scales = weight.abs().amax(dim=1) / 127
    int8_weight = torch.round(weight / scales[:, None]).to(torch.int8).contiguous()
    bf16_scales = scales.to(torch.bfloat16)

    group = 32
    grouped = weight.reshape(out_features, in_features // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    step = (high - low).clamp(min=1e-6) / 15
    int4_values = torch.clamp(torch.round((grouped - low[..., None]) / step[..., None]), 0, 15).to(torch.int32).reshape(out_features, in_features)
    int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_values, 2)
    # The kernel computes (q - 8) * scale + zero per group, from [groups, out_features, 2] pairs.
    scales_and_zeros = torch.stack([step.t(), (low + 8 * step).t()], dim=-1).to(torch.bfloat16).contiguous()

    bf16_weight = weight.to(torch.bfloat16)
    return {
        "int8 dynamic (fbgemm)": lambda x: dynamic(x),
        "int8 weights, bf16 activations": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), int8_weight, bf16_scales),
        "int4 weights, bf16 activations": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), int4_weight, group, scales_and_zeros),
        "bf16": lambda x: torch.nn.functional.linear(x.bfloat16(), bf16_weight),
        "fp32": lambda x: torch.nn.functional.linear(x, weight),
    }


def time_linears(repeats: int) -> dict[str, dict[str, float]]:
    """Return median µs per kernel, keyed by "in x out, rows" and kernel name."""
    import torch

    results: dict[str, dict[str, float]] = {}
    for in_features, out_features in LINEAR_SHAPES:
        kernels = linear_kernels(in_features, out_features)
        for rows in (1, 8):
            x = torch.randn(rows, in_features)
            results[f"{in_features} x {out_features}, {rows} row{'s' if rows > 1 else ''}"] = {
                name: 1000 * median_ms(lambda: kernel(x), repeats) for name, kernel in kernels.items()
            }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.draft_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="draft-kernels", help="result file name")
    parser.add_argument("--repeats", type=int, default=9, help="timed forwards per row count")
    args = parser.parse_args(argv)

    import warnings

    import torch
    from transformers import AutoTokenizer

    from bench.run_bench import machine_description
    from services.draft.vocab import VocabSubset, special_token_ids
    from services.launcher import default_cpu_split
    from shared.config import Settings
    from shared.modeling import load_causal_lm, place_process, quantize_int8

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = Settings()
    _, draft_cpus = default_cpu_split()
    device = place_process("cpu", 1, draft_cpus)
    tokenizer = AutoTokenizer.from_pretrained(settings.draft_model)

    forwards = {}
    with torch.inference_mode():
        for label in ("int8", "bf16"):
            int8 = label == "int8"
            model = load_causal_lm(settings.draft_model, "float32" if int8 else "bfloat16", device)
            VocabSubset(model, settings.draft_vocab_size, special_token_ids(tokenizer, model), quantize=int8)
            if int8:
                model = quantize_int8(model)
            forwards[label] = time_forwards(model, args.repeats)
            del model
        linears = time_linears(repeats=20 * args.repeats)

    command = command_line("bench.draft_kernels", argv)
    kernel_names = list(next(iter(linears.values())))
    lines = [
        "# Draft forward and linear kernels by weight format",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; on CPU {draft_cpus or 'any'}, one torch thread",
        f"- draft: `{settings.draft_model}`, output layer over {settings.draft_vocab_size} ids; medians",
        "",
        f"Whole draft forward, ms, over N new tokens after {CONTEXT} tokens of context:",
        "",
        "| weights | " + " | ".join(f"N = {rows}" for rows in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
    ]
    for label, times in forwards.items():
        lines.append(f"| {label} | " + " | ".join(f"{times[rows]:.1f}" for rows in ROWS) + " |")
    lines += [
        "",
        "One linear layer, µs (weights hot in cache, so faster than inside the model):",
        "",
        "| shape (in x out), rows | " + " | ".join(kernel_names) + " |",
        "|---|" + "---|" * len(kernel_names),
    ]
    for shape, times in linears.items():
        lines.append(f"| {shape} | " + " | ".join(f"{times[name]:.0f}" for name in kernel_names) + " |")
    out = ROOT / "bench" / "results"
    write_results(out, args.name, {"command": command, "forwards_ms": forwards, "linears_us": linears}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
