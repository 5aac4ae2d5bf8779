"""Time the draft's speculation-cache build by phase (glue, fork, tree, publish), bf16 against int8.

Also times the draft's output layer inside each build (over the glue and tree
forwards), the share a sub-vocabulary output layer cuts.

Runs the draft engine in this process on one core with one thread, on HumanEval
prompts, building the cache for K = 4 with 8 branches per step, as the SSD
deployment does. Writes ``bench/results/draft-speed.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.run_bench import command_line, write_results

ROOT = Path(__file__).resolve().parent.parent


class OutputLayerTimer:
    """Wall time spent in a model's output layer, through global module hooks.

    The hooks look the layer up on every call because a sub-vocabulary output
    layer is replaced when requests bring new tokens.
    """

    def __init__(self, model):
        self.model = model
        self.total_s = 0.0
        self._started = 0.0

    def __enter__(self) -> "OutputLayerTimer":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._before), register_module_forward_hook(self._after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module, args) -> None:
        if module is self.model.get_output_embeddings():
            self._started = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if module is self.model.get_output_embeddings():
            self.total_s += time.perf_counter() - self._started


def time_builds(engine, prompts: list[list[int]], k: int, fanout: list[int], steps: int, client, namespace: str) -> dict[str, float]:
    from shared import keys
    from shared.protocol import CacheEntry, encode

    phases: dict[str, list[float]] = {"glue": [], "fork": [], "tree": [], "publish": []}
    output_layer: list[float] = []
    timer = OutputLayerTimer(engine.model)
    for index, prompt in enumerate(prompts):
        seq = engine.prefill(f"bench-{index}", prompt)
        base = len(prompt) - 1
        tokens = [prompt[-1]] + engine.draft(seq, k)[0]
        for step in range(steps):
            before = timer.total_s
            with timer:
                build = engine.build_cache(seq, base, tokens, fanout, k)
            output_layer.append(timer.total_s - before)
            started = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for branch in build.branches:
                pipe.set(keys.spec_entry(namespace, seq.request_id, step, branch.accepted, branch.token), encode(CacheEntry(tokens=branch.tokens)), px=5000)
            pipe.execute()
            phases["publish"].append(time.perf_counter() - started)
            phases["glue"].append(build.glue_s)
            phases["fork"].append(build.fork_s)
            phases["tree"].append(build.tree_s)
            # Continue as if every draft and the first bonus candidate were accepted.
            bonus = next(b for b in build.branches if b.accepted == k)
            base += k + 1
            tokens = [bonus.token] + bonus.tokens
        engine.release(seq.request_id)
    medians = {phase: 1000 * statistics.median(values) for phase, values in phases.items()}
    # Part of glue and tree, not a phase of its own.
    medians["output_layer"] = 1000 * statistics.median(output_layer)
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.draft_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="cache builds per prompt")
    parser.add_argument(
        "--variants",
        default="bf16,int8,int8-v65536,int8-v32768",
        help="comma-separated draft variants: bf16 or int8 weights, with -v<N> for an output layer over the first N token ids plus those in use",
    )
    parser.add_argument("--name", default="draft-speed", help="result file name")
    args = parser.parse_args(argv)

    import redis
    import torch
    from transformers import AutoTokenizer

    from bench.run_bench import machine_description
    from services.draft.engine import DraftEngine
    from services.draft.vocab import VocabSubset, special_token_ids
    from services.launcher import default_cpu_split
    from shared.config import Settings
    from shared.modeling import load_causal_lm, place_process, quantize_int8

    settings = Settings()
    _, draft_cpus = default_cpu_split()
    device = place_process("cpu", 1, draft_cpus)
    tokenizer = AutoTokenizer.from_pretrained(settings.draft_model)
    rows = [json.loads(line) for line in (ROOT / "bench" / "data" / "humaneval.jsonl").read_text().splitlines()][: args.num_prompts]
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    client = redis.Redis.from_url(settings.redis_url)
    k, fanout = 4, [2, 1, 1, 1, 3]

    results = {}
    for label in args.variants.split(","):
        weights, _, size = label.partition("-v")
        int8 = weights == "int8"
        model = load_causal_lm(settings.draft_model, "float32" if int8 else "bfloat16", device)
        vocab = VocabSubset(model, int(size), special_token_ids(tokenizer, model), quantize=int8) if size else None
        if int8:
            model = quantize_int8(model)
        with torch.inference_mode():
            results[label] = time_builds(DraftEngine(model, device, vocab), prompts, k, fanout, args.steps, client, "draft-speed")
        del model

    command = command_line("bench.draft_speed", argv)
    lines = [
        "# Draft cache-build time by phase",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; draft on CPU {draft_cpus or 'any'}, one torch thread",
        f"- draft: `{settings.draft_model}`; K = {k}, fan-out {fanout} ({sum(fanout)} branches); {len(prompts)} HumanEval prompts x {args.steps} builds; medians in ms",
        "",
        "| draft (weights, -v<N>: output layer over the first N ids plus those in use) | glue | fork | tree (K forwards) | publish | total | output layer, within glue and tree |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, phases in results.items():
        total = sum(phases[phase] for phase in ("glue", "fork", "tree", "publish"))
        lines.append(
            f"| {label} | {phases['glue']:.1f} | {phases['fork']:.2f} | {phases['tree']:.1f} | {phases['publish']:.2f} | {total:.1f} | {phases['output_layer']:.1f} |"
        )
    out = ROOT / "bench" / "results"
    write_results(out, args.name, {"command": command, "results": results}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
