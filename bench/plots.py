"""Draw PNG charts from a benchmark result JSON written by bench.run_bench.

Charts: decode tokens/s per mode, and acceptance rate per draft position for
the speculative modes. Each chart carries the benchmark's command in its footer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.plots", description=__doc__.splitlines()[0])
    parser.add_argument("result", help="path of a bench/results/*.json file")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(args.result)
    result = json.loads(path.read_text())
    runs = result["runs"]
    footer = f"{result['command']} | {result['machine']}"

    figure, axis = plt.subplots(figsize=(8, 4.5))
    labels = [run["label"] for run in runs]
    speeds = [run["decode_tokens_per_s"] for run in runs]
    bars = axis.bar(labels, speeds, color="#3a7ca5")
    axis.bar_label(bars, fmt="%.2f")
    axis.set_ylabel("decode tokens/s")
    axis.set_title(f"{result['name']}: decode speed per mode")
    figure.text(0.01, 0.01, footer, fontsize=6)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    speed_png = path.with_name(f"{path.stem}-tokens-per-s.png")
    figure.savefig(speed_png, dpi=120)
    plt.close(figure)

    speculative = [run for run in runs if run.get("acceptance_rate_per_position")]
    if speculative:
        figure, axis = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(speculative)
        for index, run in enumerate(speculative):
            rates = run["acceptance_rate_per_position"]
            positions = [p + index * width for p in range(len(rates))]
            axis.bar(positions, rates, width=width, label=run["label"])
        axis.set_xlabel("draft position (0-based)")
        axis.set_ylabel("fraction of steps accepting it")
        axis.set_ylim(0, 1)
        axis.legend()
        axis.set_title(f"{result['name']}: acceptance per draft position")
        figure.text(0.01, 0.01, footer, fontsize=6)
        figure.tight_layout(rect=(0, 0.04, 1, 1))
        figure.savefig(path.with_name(f"{path.stem}-acceptance.png"), dpi=120)
        plt.close(figure)
    print(speed_png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
