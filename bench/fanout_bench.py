"""Compare fan-out policies by speculation-cache hit rate at the same budget, in one run.

Runs SSD deployments (K = 4) that differ only in the fan-out policy and budget:
uniform (a fixed even list), geometric (the closed-form rule with a measured
acceptance rate) and adaptive (measured acceptance lengths and candidate ranks).
Sampling at the given temperature with fixed seeds, so every policy verifies the
same committed tokens.

Runs also differ in which drafts they verify, so their lookups differ. For a
paired comparison on identical lookups, the verifier counts each lookup's
acceptance length and the rank of the committed token among the draft's
candidates (``saguaro:spec_cache_committed_rank``). A list f caches that token
exactly when rank < f_j, so the uniform list's hits on the same lookups follow
from the counts. Writes ``bench/results/fanout-<temperature>.md`` and ``.json``,
and with several budgets a chart of hit rate against budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import uuid
from pathlib import Path

from bench.run_bench import command_line

ROOT = Path(__file__).resolve().parent.parent


def ranked_lookups(stack, k: int) -> dict:
    """Return the verify service's ranked lookups: per acceptance length j, counts of committed-token rank <= r, plus hits.

    ``rank_le[j][r]`` counts lookups after j accepted drafts whose committed token
    had rank <= r among the draft's candidates (r = 0..15), ``total[j]`` all such lookups.
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    rank_le = [[0.0] * 16 for _ in range(k + 1)]
    total = [0.0] * (k + 1)
    hits = 0.0
    text = httpx.get(stack.metrics_url("verify"), timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("saguaro:spec_cache_committed_rank"):
                continue
            j = int(sample.labels["accepted"])
            if sample.name.endswith("_count"):
                total[j] += sample.value
                if sample.labels["result"] == "hit":
                    hits += sample.value
            elif sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                rank_le[j][int(float(sample.labels["le"]))] += sample.value
    return {"rank_le": rank_le, "total": total, "hits": hits}


def hits_of_list(lookups: dict, fanout: list[int]) -> float:
    """Return how many of ``lookups`` a cache built with the fixed list ``fanout`` would have hit."""
    return sum(lookups["rank_le"][j][min(f, 16) - 1] for j, f in enumerate(fanout) if f > 0)


def best_list(lookups: dict, k: int, budget: int) -> tuple[list[int], float]:
    """Return the fixed list of ``budget`` branches with the most hits on ``lookups``, and its hits (exhaustive search)."""
    best: tuple[list[int], float] = ([], -1.0)
    for cuts in itertools.combinations(range(budget + k), k):
        # Stars and bars: k cuts among budget + k slots split the budget over k + 1 lengths.
        bounds = (-1, *cuts, budget + k)
        fanout = [bounds[j + 1] - bounds[j] - 1 for j in range(k + 1)]
        hits = hits_of_list(lookups, fanout)
        if hits > best[1]:
            best = (fanout, hits)
    return best


def run_policy(name: str, extra: dict[str, str], budget: int, k: int, prompts: list[list[int]], args) -> tuple[dict, list[list[int]]]:
    import redis

    from bench.direct_client import generate
    from services.launcher import Stack

    namespace = f"fanout-{uuid.uuid4().hex[:8]}"
    env = {
        "SAGUARO_NAMESPACE": namespace,
        "SAGUARO_MODE": "ssd",
        "SAGUARO_NUM_SPECULATIVE_TOKENS": str(k),
        "SAGUARO_FANOUT_BUDGET": str(budget),
        "SAGUARO_BACKUP": "jit",
        # Fixed K and cache steps throughout: with a poor list the verifier would otherwise switch to JIT steps.
        "SAGUARO_SPECULATION_BACKOFF": "false",
        **extra,
    }
    log_dir = ROOT / "logs" / "bench" / f"fanout-{name}-{budget}"
    hits = misses = steps = tokens = 0
    outputs = []
    with Stack(env=env, services=("draft", "verify"), log_dir=log_dir, start_timeout_s=600) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        for seed, prompt in enumerate(prompts):
            result = generate(client, namespace, prompt, temperature=args.temperature, seed=seed, max_tokens=args.max_tokens, ignore_eos=True, timeout_s=1800)
            stats = result.finish.stats
            hits += stats.cache_hits
            misses += stats.cache_misses
            steps += stats.steps
            tokens += result.finish.usage.completion_tokens
            outputs.append(result.token_ids)
        lookups = ranked_lookups(stack, k)
    # The verify service logs each fan-out list it switches to.
    lists = []
    for path in log_dir.glob("verify*.log"):
        lists += [line.split("now ", 1)[1].split(" (")[0] for line in path.read_text().splitlines() if "fan-out per acceptance length now" in line]
    row = {
        "policy": name,
        "budget": budget,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / max(1, hits + misses),
        "mean_acceptance_length": tokens / steps,
        "fanout_lists": extra.get("SAGUARO_FANOUT") or "; ".join(lists[-3:]),
        "ranked_lookups": lookups,
    }
    return row, outputs


def plot(rows: list[dict], path: Path, temperature: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(row["policy"] for row in rows):
        points = sorted((row["budget"], row["hit_rate"]) for row in rows if row["policy"] == policy)
        axis.plot([b for b, _ in points], [100 * h for _, h in points], marker="o", label=policy)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("fan-out budget (branches per step)")
    axis.set_ylabel("cache hit rate (%)")
    axis.set_title(f"SSD hit rate against fan-out budget, T = {temperature}")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fanout_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--budgets", default="8", help="comma-separated fan-out budgets (branches per step)")
    parser.add_argument("--policies", default="uniform,geometric,adaptive", help="comma-separated: uniform, geometric, adaptive")
    parser.add_argument("--prompt-set", default="humaneval")
    parser.add_argument("--name", default="", help="result file name (default: fanout-t<temperature>)")
    parser.add_argument("--report", metavar="JSON", help="rewrite the markdown and chart of an earlier run's JSON result instead of running")
    args = parser.parse_args(argv)
    if args.report:
        path = Path(args.report)
        write_report(json.loads(path.read_text()), path.parent, path.name.removesuffix(".json"))
        return 0

    from bench.run_bench import load_prompt_ids, machine_description
    from shared.fanout import uniform_fanout

    prompts = load_prompt_ids(args.prompt_set, args.num_prompts)
    k = 4
    budgets = [int(b) for b in args.budgets.split(",")]
    rows = []
    outputs = []
    for budget in budgets:
        policies = {
            "uniform": {"SAGUARO_FANOUT": ",".join(str(f) for f in uniform_fanout(k, budget))},
            "geometric": {"SAGUARO_FANOUT_POLICY": "geometric"},
            "adaptive": {"SAGUARO_FANOUT_POLICY": "adaptive"},
        }
        for name in args.policies.split(","):
            row, output = run_policy(name, policies[name], budget, k, prompts, args)
            rows.append(row)
            outputs.append(output)

    command = command_line("bench.fanout_bench", argv)
    result = {
        "command": command.strip(),
        "machine": machine_description(),
        "k": k,
        "num_prompts": len(prompts),
        "prompt_set": args.prompt_set,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "outputs_identical": all(o == outputs[0] for o in outputs),
        "rows": rows,
    }
    out = ROOT / "bench" / "results"
    stem = args.name or f"fanout-t{args.temperature}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, stem)
    return 0


def write_report(result: dict, out: Path, stem: str) -> None:
    """Write ``<stem>.md`` in ``out``, and with several budgets ``<stem>-hit-rate.png``, from a run's result."""
    from shared.fanout import uniform_fanout

    k = result["k"]
    lines = [
        f"# Fan-out policies at temperature {result['temperature']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}; verify on core 0, draft on core 1",
        f"- SSD with cache steps throughout, K = {k}, JIT backup, coupled acceptance; {result['num_prompts']} {result['prompt_set']} prompts "
        f"x {result['max_tokens']} tokens, seeds 0..{result['num_prompts'] - 1}",
        f"- outputs identical across policies and budgets (same seeds): {result['outputs_identical']}",
        "",
        "| budget | policy | cache hits | misses | hit rate | mean acceptance length | fan-out lists (last logged) "
        "| ranked lookups | policy's hits on them | uniform list's hits on the same lookups | best fixed list's hits on them |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lookups = row["ranked_lookups"]
        count = max(1.0, sum(lookups["total"]))
        uniform_hits = hits_of_list(lookups, uniform_fanout(k, row["budget"]))
        best, best_hits = best_list(lookups, k, row["budget"])
        paired = (
            f"{int(sum(lookups['total']))} | {int(lookups['hits'])} ({lookups['hits'] / count:.1%}) "
            f"| {int(uniform_hits)} ({uniform_hits / count:.1%}) | {int(best_hits)} ({best_hits / count:.1%}, {','.join(map(str, best))})"
        )
        lines.append(
            f"| {row['budget']} | {row['policy']} | {row['hits']} | {row['misses']} | {row['hit_rate']:.1%} "
            f"| {row['mean_acceptance_length']:.2f} | {row['fanout_lists']} | {paired} |"
        )
    lines += [
        "",
        "Ranked lookups are those after a K-draft speculation, where the verifier knows the",
        "committed token's rank among the draft's candidates. The last three columns count hits on",
        "exactly those lookups: the policy's own, the uniform list's, and the best any fixed list",
        "of the same budget could have had (found by trying every list, so it knows the answers).",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if len({row["budget"] for row in result["rows"]}) > 1:
        plot(result["rows"], out / f"{stem}-hit-rate.png", result["temperature"])
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
