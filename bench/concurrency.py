"""Throughput against concurrency: AR and SSD with continuous batching, and greedy equality with solo runs.

For each mode one deployment (draft and verify services as separate processes,
target on one core, draft on the other) serves the prompts in waves of
``concurrency`` requests submitted together through the Redis request stream.
Aggregate throughput is the tokens of all requests divided by the wall time of
all waves. At every concurrency each request's greedy output is compared with
its output at concurrency 1 in the same mode.

Writes ``bench/results/<name>.json`` and ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import uuid
from pathlib import Path

from bench.run_bench import ROOT, command_line, load_prompt_ids, machine_description, write_results

logger = logging.getLogger("saguaro.bench")


def run_waves(client, namespace: str, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    from bench.direct_client import collect, submit

    outputs: list[list[int]] = []
    steps = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), concurrency):
        wave = prompts[first : first + concurrency]
        ids = [submit(client, namespace, prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True) for prompt in wave]
        for request_id in ids:
            result = collect(client, namespace, request_id, timeout_s=3600)
            if result.finish is None:
                raise RuntimeError(f"request {request_id} failed: {result.error}")
            outputs.append(result.token_ids)
            steps += result.finish.stats.steps
    wall = time.perf_counter() - started
    tokens = sum(len(tokens) for tokens in outputs)
    return {"concurrency": concurrency, "outputs": outputs, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": steps}


def steps_by_kind(stack) -> dict[str, float]:
    """Return the verify service's step counts by kind of speculation (cache, jit, plain), from its metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(httpx.get(stack.metrics_url("verify"), timeout=10).text):
        for sample in family.samples:
            if sample.name == "saguaro:verify_steps_total":
                counts[sample.labels["kind"]] = sample.value
    return counts


def run_mode(mode: str, prompts: list[list[int]], levels: list[int], max_tokens: int, k: int, log_dir: Path) -> list[dict]:
    import redis

    from bench.direct_client import generate
    from services.launcher import Stack

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"SAGUARO_NAMESPACE": namespace, "SAGUARO_MODE": mode, "SAGUARO_NUM_SPECULATIVE_TOKENS": str(k), "SAGUARO_MAX_NUM_SEQS": str(max(levels))}
    rows = []
    with Stack(env=env, services=("draft", "verify"), log_dir=log_dir / mode, start_timeout_s=600) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        generate(client, namespace, prompts[0], temperature=0.0, max_tokens=4, ignore_eos=True, timeout_s=600)
        for level in levels:
            before = steps_by_kind(stack)
            row = run_waves(client, namespace, prompts, level, max_tokens)
            after = steps_by_kind(stack)
            row["step_kinds"] = {kind: int(after[kind] - before.get(kind, 0.0)) for kind in after if after[kind] > before.get(kind, 0.0)}
            row["mode"] = mode
            rows.append(row)
            logger.info("%s at concurrency %d: %.2f tokens/s", mode, level, row["tokens_per_s"])
    return rows


def render_markdown(result: dict) -> str:
    lines = [
        f"# Benchmark {result['name']}: throughput against concurrency",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- prompts: {result['num_prompts']} from {result['prompt_set']}, {result['max_tokens']} new tokens each (EOS ignored), greedy",
        "- placement: verify on CPU 0, draft on CPU 1, one torch thread each; every mode batches all running requests into one target forward per step, and the draft serves the drafts or cache builds of a step as one batched request",
        f"- started {result['started']}, took {result['elapsed_s'] / 60:.1f} min",
        "",
        "| mode | concurrency | aggregate tokens/s | vs AR at the same concurrency | tokens per step and request | verify steps by kind | outputs equal to concurrency 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    ar = {row["concurrency"]: row for row in result["rows"] if row["mode"] == "ar"}
    for row in result["rows"]:
        base = ar.get(row["concurrency"])
        ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(row.get("step_kinds", {}).items())) or "-"
        lines.append(
            f"| {row['mode']} | {row['concurrency']} | {row['tokens_per_s']:.2f} | {ratio} | {row['tokens'] / row['steps']:.2f} | {kinds} | {row['equal_to_solo']} |"
        )
    lines += ["", f"Greedy outputs of every mode and concurrency equal AR at concurrency 1: {result['all_equal_ar_solo']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.concurrency", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-set", default="humaneval")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,8", help="comma-separated concurrency levels")
    parser.add_argument("--modes", default="ar,ssd", help="comma-separated Saguaro modes: ar, sd, ssd")
    parser.add_argument("--k", type=int, default=4, help="K of the speculative modes")
    parser.add_argument("--name", default="concurrency")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    prompts = load_prompt_ids(args.prompt_set, args.num_prompts)
    levels = [int(level) for level in args.levels.split(",")]
    started = time.time()
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rows.extend(run_mode(mode, prompts, levels, args.max_tokens, args.k, ROOT / "logs" / "bench" / args.name))

    solo = {row["mode"]: row["outputs"] for row in rows if row["concurrency"] == 1}
    for row in rows:
        row["equal_to_solo"] = row["outputs"] == solo.get(row["mode"])
    reference = solo.get("ar")
    result = {
        "name": args.name,
        "command": command_line("bench.concurrency", argv),
        "machine": machine_description(),
        "prompt_set": args.prompt_set,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "rows": rows,
        "all_equal_ar_solo": all(row["outputs"] == reference for row in rows) if reference is not None else None,
    }
    write_results(Path(args.out_dir), args.name, result, render_markdown(result))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
