"""Time the target's decode forwards with row attention against SDPA, on one CPU core.

Row attention (``shared.row_attention``, the verify service's default) makes a
position's logits independent of the forward's shape. It runs a Python loop over
query rows in every layer and a second row in one-token forwards. This
benchmark measures what that costs for the forwards the verify service runs: one
token (AR and plain steps), K + 1 = 5 tokens (a verification) and packed batches
of 4 and 8 sequences with 5 tokens each, after contexts of about CONTEXT tokens.

Writes ``bench/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.draft_kernels import median_ms
from bench.run_bench import command_line, write_results

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 300
# (sequences, tokens per sequence) of each timed forward.
CASES = ((1, 1), (1, 5), (4, 5), (8, 5))


def time_cases(engine, repeats: int) -> dict[str, float]:
    """Return the median ms of ``engine.forward_batch`` for each case in CASES."""
    import torch

    from shared.modeling import crop_cache

    generator = torch.Generator().manual_seed(0)
    largest = max(count for count, _ in CASES)
    # Contexts of different lengths around CONTEXT, as in a real batch.
    prompts = [torch.randint(0, 30000, (CONTEXT - 40 + 10 * i,), generator=generator).tolist() for i in range(largest)]
    seqs = [engine.prefill(f"bench{i}", prompt) for i, prompt in enumerate(prompts)]
    results = {}
    for count, tokens in CASES:
        batch = seqs[:count]
        token_lists = [[seq.root] + [11] * (tokens - 1) for seq in batch]
        lengths = [seq.cache.get_seq_length() for seq in batch]

        def forward():
            engine.forward_batch(batch, token_lists)
            for seq, length in zip(batch, lengths):
                crop_cache(seq.cache, length)

        results[f"{count} x {tokens}"] = median_ms(forward, repeats)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.row_attention", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="row-attention", help="result file name")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards per case")
    args = parser.parse_args(argv)

    import torch

    from bench.run_bench import machine_description
    from services.launcher import default_cpu_split
    from services.verify.engine import TargetEngine
    from shared.config import Settings
    from shared.modeling import load_causal_lm, place_process

    settings = Settings()
    verify_cpus, _ = default_cpu_split()
    device = place_process("cpu", 1, verify_cpus)
    timings = {}
    with torch.inference_mode():
        for label, invariant in (("sdpa", False), ("row attention", True)):
            model = load_causal_lm(settings.target_model, "bfloat16", device)
            timings[label] = time_cases(TargetEngine(model, device, batch_invariant=invariant), args.repeats)
            del model

    command = command_line("bench.row_attention", argv)
    lines = [
        "# Target decode forwards: row attention against SDPA",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; on CPU {verify_cpus or 'any'}, one torch thread",
        f"- target: `{settings.target_model}` in bf16; contexts of {CONTEXT - 40} to {CONTEXT + 10 * (max(c for c, _ in CASES) - 1) - 40} tokens; medians of {args.repeats} forwards",
        "",
        "| sequences x tokens | SDPA ms | row attention ms | change |",
        "|---|---|---|---|",
    ]
    for case in timings["sdpa"]:
        base, rows = timings["sdpa"][case], timings["row attention"][case]
        lines.append(f"| {case} | {base:.1f} | {rows:.1f} | {100 * (rows / base - 1):+.1f}% |")
    out = ROOT / "bench" / "results"
    write_results(out, args.name, {"command": command, "context": CONTEXT, "forwards_ms": timings}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
