"""Show which row counts the target's linear layers round alike, on one CPU core, by dtype.

The verify service pads or splits the rows of every decode forward's linear
layers into the largest class of row counts that round alike
(``shared.row_attention.invariant_rows``). This benchmark prints the runs of
consecutive counts that share a class, so the kernel paths behind that class
can be read off for the machine at hand.

Writes ``bench/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench.run_bench import command_line, write_results

ROOT = Path(__file__).resolve().parent.parent
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def class_runs(classes: dict[int, tuple[int | None, ...]]) -> list[tuple[int, int, tuple[int | None, ...]]]:
    """Return (first count, last count, classes per layer) for each run of consecutive counts with equal classes."""
    runs: list[tuple[int, int, tuple[int | None, ...]]] = []
    for count in sorted(classes):
        if runs and runs[-1][2] == classes[count] and runs[-1][1] == count - 1:
            runs[-1] = (runs[-1][0], count, classes[count])
        else:
            runs.append((count, count, classes[count]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.row_classes", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="row-classes", help="result file name")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated target dtypes to probe")
    parser.add_argument(
        "--max-features",
        type=int,
        default=None,
        help="output features probed per layer (default: the service's PROBE_MAX_FEATURES; 0: every output feature)",
    )
    args = parser.parse_args(argv)

    from bench.run_bench import machine_description
    from services.launcher import default_cpu_split
    from shared import row_attention
    from shared.config import Settings
    from shared.modeling import load_causal_lm, place_process

    settings = Settings()
    verify_cpus, _ = default_cpu_split()
    device = place_process("cpu", 1, verify_cpus)
    max_features = row_attention.PROBE_MAX_FEATURES if args.max_features is None else (args.max_features or None)
    results = {}
    for dtype in args.dtypes.split(","):
        model = load_causal_lm(settings.target_model, dtype, device)
        started = time.perf_counter()
        classes = row_attention.row_classes(model, max_features=max_features)
        probe_s = time.perf_counter() - started
        chosen = row_attention.largest_class(classes)
        results[dtype] = {
            "probe_s": probe_s,
            "runs": [{"first": first, "last": last, "classes": list(layer_classes)} for first, last, layer_classes in class_runs(classes)],
            "range": None if chosen is None else [chosen.low, chosen.high],
            "counts": None if chosen is None else sorted(chosen.counts or range(chosen.low, chosen.high + 1)),
            "chosen": "none" if chosen is None else chosen.describe(),
        }
        del model

    # Variables that cap the instruction sets of oneDNN, MKL and ATen, so one machine can stand in for an older CPU.
    isa_limits = " ".join(f"{name}={os.environ[name]}" for name in ISA_VARIABLES if name in os.environ)
    command = (isa_limits + " " if isa_limits else "") + command_line("bench.row_classes", argv)
    lines = [
        "# Row counts at which the target's linear layers round alike",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; on CPU {verify_cpus or 'any'}, one torch thread",
        f"- target: `{settings.target_model}`; probe of `shared.row_attention.row_classes`, counts 1 to {row_attention.PROBE_MAX_ROWS}, "
        + ("every output feature" if max_features is None else f"up to {max_features} output features") + " per layer",
        "",
        "Each row is a run of consecutive row counts with the same class in every distinct linear layer",
        "(one index per layer; - marks a count at which a row's position changes its result).",
        "",
        "| dtype | row counts | classes per layer | chosen counts | probe s |",
        "|---|---|---|---|---|",
    ]
    for dtype, result in results.items():
        chosen = result["chosen"]
        for run in result["runs"]:
            counts = str(run["first"]) if run["first"] == run["last"] else f"{run['first']} to {run['last']}"
            layer_classes = ", ".join("-" if index is None else str(index) for index in run["classes"])
            lines.append(f"| {dtype} | {counts} | {layer_classes} | {chosen} | {result['probe_s']:.1f} |")
    data = {"command": command, "max_features": max_features, "dtypes": results}
    write_results(ROOT / "bench" / "results", args.name, data, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
