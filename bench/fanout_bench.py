"""Compare fan-out policies by speculation-cache hit rate at the same budget, in one run.

Runs SSD deployments (K = 4, 8 branches) that differ only in the fan-out policy:
uniform (a fixed even list), geometric (the closed-form rule with a measured
acceptance rate) and adaptive (measured acceptance lengths and candidate ranks).
Sampling at the given temperature with fixed seeds, so every policy verifies the
same committed tokens. Writes ``bench/results/fanout-<temperature>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fanout_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import redis
    from transformers import AutoTokenizer

    from bench.direct_client import generate
    from bench.run_bench import load_prompts, machine_description
    from services.launcher import Stack
    from shared.config import Settings
    from shared.fanout import uniform_fanout

    settings = Settings()
    tokenizer = AutoTokenizer.from_pretrained(settings.target_model)
    prompts = [tokenizer(text)["input_ids"] for text in load_prompts("humaneval", args.num_prompts)]
    k, budget = 4, 8
    policies = {
        "uniform": {"SAGUARO_FANOUT": ",".join(str(f) for f in uniform_fanout(k, budget))},
        "geometric": {"SAGUARO_FANOUT_POLICY": "geometric"},
        "adaptive": {"SAGUARO_FANOUT_POLICY": "adaptive"},
    }
    results = {}
    outputs = {}
    for name, extra in policies.items():
        namespace = f"fanout-{uuid.uuid4().hex[:8]}"
        env = {"SAGUARO_NAMESPACE": namespace, "SAGUARO_MODE": "ssd", "SAGUARO_NUM_SPECULATIVE_TOKENS": str(k), "SAGUARO_FANOUT_BUDGET": str(budget), "SAGUARO_BACKUP": "jit", **extra}
        with Stack(env=env, services=("draft", "verify"), log_dir=ROOT / "logs" / "bench" / f"fanout-{name}", start_timeout_s=600) as stack:
            client = redis.Redis.from_url(stack.redis_url)
            hits = misses = steps = tokens = 0
            outputs[name] = []
            for seed, prompt in enumerate(prompts):
                result = generate(client, namespace, prompt, temperature=args.temperature, seed=seed, max_tokens=args.max_tokens, ignore_eos=True, timeout_s=1800)
                stats = result.finish.stats
                hits += stats.cache_hits
                misses += stats.cache_misses
                steps += stats.steps
                tokens += result.finish.usage.completion_tokens
                outputs[name].append(result.token_ids)
        results[name] = {"hits": hits, "misses": misses, "hit_rate": hits / max(1, hits + misses), "mean_acceptance_length": tokens / steps}

    command = "python -m bench.fanout_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Fan-out policies at temperature {args.temperature}",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; verify on core 0, draft on core 1",
        f"- SSD, K = {k}, {budget} branches per step, JIT backup; {len(prompts)} HumanEval prompts x {args.max_tokens} tokens, seeds 0..{len(prompts) - 1}",
        f"- outputs identical across policies (same seeds): {all(o == outputs['uniform'] for o in outputs.values())}",
        "",
        "| policy | cache hits | misses | hit rate | mean acceptance length |",
        "|---|---|---|---|---|",
    ]
    for name, row in results.items():
        lines.append(f"| {name} | {row['hits']} | {row['misses']} | {row['hit_rate']:.0%} | {row['mean_acceptance_length']:.2f} |")
    out = ROOT / "bench" / "results"
    stem = f"fanout-t{args.temperature}"
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
