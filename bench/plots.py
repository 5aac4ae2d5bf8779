"""Draw PNG charts from a benchmark result JSON written by bench.run_bench.

Charts from ``bench.run_bench``: decode tokens/s per mode, acceptance rate per
draft position and the histogram of acceptance lengths for the speculative
modes. From ``bench.concurrency``: aggregate throughput against concurrency.
Each chart carries the benchmark's command in its footer.
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
    footer = f"{result['command']} | {result['machine']}"
    if "rows" in result:
        print(plot_concurrency(plt, result, path, footer))
        return 0
    runs = result["runs"]

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

    speculative = [run for run in runs if run.get("acceptance_rate_per_position") and not run["label"].startswith("ar")]
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
        plot_acceptance_lengths(plt, result, speculative, path, footer)
    print(speed_png)
    return 0


def acceptance_length_histogram(run: dict) -> list[float]:
    """Return the fraction of steps that accepted j = 0..K drafts.

    ``acceptance_rate_per_position[i]`` is the fraction of steps whose
    acceptance length is at least i + 1, so differences give the histogram.
    """
    at_least = [1.0] + list(run["acceptance_rate_per_position"]) + [0.0]
    return [at_least[j] - at_least[j + 1] for j in range(len(at_least) - 1)]


def plot_acceptance_lengths(plt, result: dict, runs: list[dict], path: Path, footer: str) -> None:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(runs)
    for index, run in enumerate(runs):
        histogram = acceptance_length_histogram(run)
        axis.bar([j + index * width for j in range(len(histogram))], histogram, width=width, label=run["label"])
    axis.set_xlabel("drafts accepted in a step (j)")
    axis.set_ylabel("fraction of steps")
    axis.legend()
    axis.set_title(f"{result['name']}: acceptance-length histogram")
    figure.text(0.01, 0.01, footer, fontsize=6)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path.with_name(f"{path.stem}-acceptance-lengths.png"), dpi=120)
    plt.close(figure)


def plot_concurrency(plt, result: dict, path: Path, footer: str) -> Path:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for mode in dict.fromkeys(row["mode"] for row in result["rows"]):
        points = sorted((row["concurrency"], row["tokens_per_s"]) for row in result["rows"] if row["mode"] == mode)
        axis.plot([c for c, _ in points], [t for _, t in points], marker="o", label=mode)
    axis.set_xlabel("concurrent requests")
    axis.set_ylabel("aggregate tokens/s")
    axis.set_title(f"{result['name']}: throughput against concurrency")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.text(0.01, 0.01, footer, fontsize=6)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    out = path.with_name(f"{path.stem}-throughput.png")
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


if __name__ == "__main__":
    sys.exit(main())
