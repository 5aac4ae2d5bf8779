"""Compare AR, SD and SSD decoding (and Hugging Face assisted generation) on the same prompts in one run.

Each Saguaro mode runs as a real deployment: the draft and verify services as
separate processes (target on one core, draft on the other) and requests sent
through the Redis request stream, as the gateway does. Every request generates
exactly ``--max-tokens`` tokens (EOS ignored), greedy. Hugging Face assisted
generation (``generate(assistant_model=...)``) runs in this process on the
verify core with one thread, on the same model directories.

Writes ``bench/results/<name>.json`` and ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_SETS = {
    "humaneval": (ROOT / "bench" / "data" / "humaneval.jsonl", "prompt"),
    "gsm8k": (ROOT / "bench" / "data" / "gsm8k.jsonl", "question"),
}

logger = logging.getLogger("saguaro.bench")


def machine_description() -> str:
    model = "unknown CPU"
    amx = False
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                amx = "amx_bf16" in line.split()
    except (OSError, subprocess.CalledProcessError):
        pass
    import torch

    from shared.modeling import cpu_has_native_matmul

    # Without native bf16 instructions a bf16 forward costs nearly a one-token forward per token, which changes every ratio.
    kernels = f"{torch.backends.cpu.get_cpu_capability()} kernels, {'native' if cpu_has_native_matmul('bfloat16') else 'no native'} bf16 matmuls"
    if amx:
        # oneDNN runs bf16 matmuls of several rows on AMX tiles: a 5-row target forward costs about a one-row one.
        kernels += " (AMX)"
    return f"{model}, {os.cpu_count()} cores, {kernels}, {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def command_line(module: str, argv: list[str] | None) -> str:
    """Return the shell command that ran ``module`` with ``argv`` (default: this process's arguments)."""
    args = argv if argv is not None else sys.argv[1:]
    return f"python -m {module} " + " ".join(shlex.quote(arg) for arg in args)


def write_results(out_dir: Path, name: str, data: dict, markdown: str) -> None:
    """Write a benchmark's ``<name>.json`` and ``<name>.md`` into ``out_dir``, creating it if needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out_dir / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")


def load_prompts(name: str, count: int) -> list[str]:
    path, field = PROMPT_SETS[name]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row[field] for row in rows[:count]]


def load_prompt_ids(name: str, count: int) -> list[list[int]]:
    """Return the first ``count`` prompts of a prompt set, tokenized with the target model's tokenizer."""
    from transformers import AutoTokenizer

    from shared.config import Settings

    tokenizer = AutoTokenizer.from_pretrained(Settings().target_model)
    return [tokenizer(text)["input_ids"] for text in load_prompts(name, count)]


class SaguaroRun:
    """One Saguaro mode deployed as draft and verify processes, with the requests it has served.

    AR mode starts no draft service, because its verifier never calls one.
    """

    def __init__(self, label: str, env: dict[str, str], log_dir: Path, temperature: float = 0.0):
        import redis

        from services.launcher import Stack

        self.label = label
        self.temperature = temperature
        self.namespace = f"bench-{uuid.uuid4().hex[:8]}"
        services = ("verify",) if env.get("SAGUARO_MODE") == "ar" else ("draft", "verify")
        self.stack = Stack(env={**env, "SAGUARO_NAMESPACE": self.namespace}, services=services, log_dir=log_dir / label, start_timeout_s=600)
        self.requests: list[dict] = []
        self.stack.start()
        self.client = redis.Redis.from_url(self.stack.redis_url)

    def warm_up(self, prompt_ids: list[int]) -> None:
        """Send one short request, so first-call allocations are not timed."""
        from bench.direct_client import generate

        generate(self.client, self.namespace, prompt_ids, temperature=0.0, max_tokens=4, ignore_eos=True, timeout_s=600)

    def run_prompt(self, index: int, prompt_ids: list[int], max_tokens: int) -> None:
        """Generate for one prompt and record its statistics."""
        from bench.direct_client import generate

        started = time.perf_counter()
        # Seeds follow the prompt index, so every mode samples the same tokens at T > 0.
        result = generate(
            self.client, self.namespace, prompt_ids, temperature=self.temperature, seed=index, max_tokens=max_tokens, ignore_eos=True, timeout_s=1800
        )
        wall = time.perf_counter() - started
        if result.finish is None:
            raise RuntimeError(f"{self.label}: request {index} failed: {result.error}")
        stats = result.finish.stats
        self.requests.append({
            "tokens": result.token_ids,
            "completion_tokens": result.finish.usage.completion_tokens,
            "wall_s": wall,
            "ttft_s": stats.ttft_s,
            "decode_s": stats.decode_s,
            "first_step_tokens": stats.first_step_tokens,
            "steps": stats.steps,
            "accepted_tokens": stats.accepted_tokens,
            "drafted_tokens": stats.drafted_tokens,
            "accepted_per_pos": stats.accepted_per_pos,
            "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses,
            "verify_s": stats.verify_s,
            "wait_draft_s": stats.wait_draft_s,
            "hit_wait_s": stats.hit_wait_s,
            "cache_build_s": getattr(stats, "cache_build_s", 0.0),
        })
        decoded = len(result.token_ids) - max(stats.first_step_tokens, 1)
        logger.info("%s prompt %d: %.2f tokens/s decode, %d steps", self.label, index, decoded / max(stats.decode_s, 1e-9), stats.steps)

    def stop(self) -> None:
        self.stack.stop()


def run_saguaro_mode(label: str, env: dict[str, str], prompts: list[list[int]], max_tokens: int, log_dir: Path, temperature: float = 0.0) -> dict:
    """Deploy one mode, run every prompt through it, stop it, and return its summary."""
    run = SaguaroRun(label, env, log_dir, temperature)
    try:
        run.warm_up(prompts[0])
        for index, prompt_ids in enumerate(prompts):
            run.run_prompt(index, prompt_ids, max_tokens)
    finally:
        run.stop()
    return summarize(label, run.requests)


def run_saguaro_interleaved(configs: list[tuple[str, dict[str, str]]], prompts: list[list[int]], max_tokens: int, log_dir: Path, temperature: float = 0.0) -> list[dict]:
    """Deploy every mode at once and run each prompt through the modes in turn; return their summaries.

    A slow spell of a shared machine then slows every mode about equally, where
    running the modes one after another would charge it to one mode.
    """
    runs: list[SaguaroRun] = []
    try:
        for label, env in configs:
            runs.append(SaguaroRun(label, env, log_dir, temperature))
        for run in runs:
            run.warm_up(prompts[0])
        for index, prompt_ids in enumerate(prompts):
            for run in runs:
                run.run_prompt(index, prompt_ids, max_tokens)
    finally:
        for run in runs:
            run.stop()
    return [summarize(run.label, run.requests) for run in runs]


def mode_settings(mode: str, args) -> tuple[str, dict[str, str]]:
    """Return the label and SAGUARO_* environment of a benchmark mode.

    ar, sd and ssd are the decoding modes (ssd with the adaptive fan-out);
    ssd-geometric and ssd-uniform fix the fan-out rule; ssd-c<C> runs the
    rejection acceptance test with Saguaro sampling factor C (ssd-c1 is plain
    rejection sampling); a -k<K> suffix sets K for that mode alone, and -v<N>
    gives the draft an output layer over the first N token ids plus those in use.
    """
    from shared.fanout import uniform_fanout

    base, *variants = mode.split("-")
    if base not in ("ar", "sd", "ssd"):
        raise SystemExit(f"unknown mode {mode!r}: use ar, sd, ssd, ssd-geometric, ssd-uniform, ssd-c<C>, a -k<K> suffix, or hf")
    k = args.sd_k if base == "sd" else args.ssd_k
    for variant in variants:
        if variant.startswith("k") and variant[1:].isdigit():
            k = int(variant[1:])
    env = {"SAGUARO_MODE": base, "SAGUARO_NUM_SPECULATIVE_TOKENS": str(k), "SAGUARO_FANOUT_BUDGET": str(args.fanout_budget)}
    for variant in variants:
        if variant == "geometric":
            env["SAGUARO_FANOUT_POLICY"] = "geometric"
        elif variant == "uniform":
            env["SAGUARO_FANOUT"] = ",".join(str(f) for f in uniform_fanout(k, args.fanout_budget))
        elif variant.startswith("c"):
            env["SAGUARO_ACCEPTANCE"] = "rejection"
            env["SAGUARO_SAGUARO_C"] = variant[1:]
        elif variant.startswith("v") and variant[1:].isdigit():
            env["SAGUARO_DRAFT_VOCAB_SIZE"] = variant[1:]
        elif not (variant.startswith("k") and variant[1:].isdigit()):
            raise SystemExit(f"unknown variant {variant!r} of mode {base}")
    if args.hardware == "same-total" and base in ("ar", "sd"):
        # Target and draft never run at the same time in AR and SD, so each may use both cores.
        env.update({"SAGUARO_VERIFY_CPUS": "0-1", "SAGUARO_DRAFT_CPUS": "0-1", "SAGUARO_VERIFY_THREADS": "2", "SAGUARO_DRAFT_THREADS": "2"})
    label = mode if base == "ar" else f"{mode.split('-k')[0]} K={k}"
    return label, env


def run_hf_assisted(target_dir: str, draft_dir: str, prompts: list[list[int]], max_tokens: int, cpus: str, dtype: str, threads: int = 1) -> dict:
    import torch

    from shared.modeling import load_causal_lm, place_process

    device = place_process("cpu", threads, cpus)
    target = load_causal_lm(target_dir, dtype, device)
    draft = load_causal_lm(draft_dir, dtype, device)
    requests = []
    for index, prompt_ids in enumerate(prompts):
        ids = torch.tensor([prompt_ids])
        mask = torch.ones_like(ids)
        common = {"attention_mask": mask, "do_sample": False, "assistant_model": draft, "eos_token_id": None, "pad_token_id": 0}
        started = time.perf_counter()
        target.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        out = target.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **common)
        wall = time.perf_counter() - started
        tokens = out[0, len(prompt_ids):].tolist()
        requests.append({
            "tokens": tokens,
            "completion_tokens": len(tokens),
            "wall_s": wall,
            "ttft_s": prefill_s,
            "decode_s": max(wall - prefill_s, 1e-9),
        })
        logger.info("hf-assisted prompt %d: %.2f tokens/s end to end", index, len(tokens) / wall)
    return summarize("hf-assisted", requests)


def summarize(label: str, requests: list[dict]) -> dict:
    completion = sum(r["completion_tokens"] for r in requests)
    wall = sum(r["wall_s"] for r in requests)
    decode = sum(r["decode_s"] for r in requests)
    steps = sum(r.get("steps", 0) for r in requests)
    summary = {
        "label": label,
        "requests": requests,
        "completion_tokens": completion,
        "tokens_per_s": completion / wall,
        # Tokens after the first step (after the first token for HF assisted generation), over the time after it.
        "decode_tokens_per_s": sum(r["completion_tokens"] - max(r.get("first_step_tokens", 1), 1) for r in requests) / decode,
        "mean_ttft_s": sum(r["ttft_s"] for r in requests) / len(requests),
    }
    if steps:
        hits = sum(r["cache_hits"] for r in requests)
        misses = sum(r["cache_misses"] for r in requests)
        per_pos = [sum(values) for values in zip(*(r["accepted_per_pos"] for r in requests))]
        summary.update({
            "steps": steps,
            "mean_acceptance_length": completion / steps,
            "acceptance_rate_per_position": [count / steps for count in per_pos],
            "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
            "verify_ms_per_step": 1000 * sum(r["verify_s"] for r in requests) / steps,
            "draft_wait_ms_per_step": 1000 * sum(r["wait_draft_s"] for r in requests) / steps,
            "cache_build_ms_per_step": 1000 * sum(r["cache_build_s"] for r in requests) / max(1, hits + misses),
        })
        if hits:
            # A hit step is a verify plus the wait for the cache that hit; compare with the verify alone.
            hit_wait_ms = 1000 * sum(r.get("hit_wait_s", 0.0) for r in requests) / hits
            summary["hit_wait_ms_per_hit"] = hit_wait_ms
            summary["hit_step_overhead"] = hit_wait_ms / summary["verify_ms_per_step"]
    return summary


def render_markdown(result: dict) -> str:
    runs = result["runs"]
    ar = next((r for r in runs if r["label"].startswith("ar")), None)
    lines = [
        f"# Benchmark {result['name']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- prompts: {result['num_prompts']} from {result['prompt_set']}, {result['max_tokens']} new tokens each (EOS ignored), "
        + ("greedy" if result.get("temperature", 0.0) == 0.0 else f"temperature {result['temperature']}, seed = prompt index"),
        f"- placement: {result['placement']}",
        f"- models: target `{result['target_model']}` ({result.get('target_dtype', 'bfloat16')}), draft `{result['draft_model']}` ({result['draft_precision']})",
        f"- started {result['started']}, took {result['elapsed_s'] / 60:.1f} min"
        + ("; the Saguaro modes ran interleaved, prompt by prompt" if result.get("interleaved") else ""),
        "",
        "| mode | tokens/s (end to end) | decode tokens/s | vs AR (decode) | mean acceptance length | cache hit rate | verify ms/step | draft wait ms/step | cache build ms/step | TTFT s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ratio = f"{run['decode_tokens_per_s'] / ar['decode_tokens_per_s']:.2f}x" if ar else "-"
        hit = run.get("cache_hit_rate")
        lines.append(
            f"| {run['label']} | {run['tokens_per_s']:.2f} | {run['decode_tokens_per_s']:.2f} | {ratio} | "
            f"{run.get('mean_acceptance_length', float('nan')):.2f} | {'-' if hit is None else f'{hit:.0%}'} | "
            f"{run.get('verify_ms_per_step', float('nan')):.0f} | {run.get('draft_wait_ms_per_step', float('nan')):.0f} | "
            f"{run.get('cache_build_ms_per_step', float('nan')):.0f} | {run['mean_ttft_s']:.2f} |"
        )
    hit_runs = [run for run in runs if run.get("hit_step_overhead") is not None]
    if hit_runs:
        lines += ["", "Step time on cache hits (verify plus the wait for the cache that hit) against the verify alone:", ""]
        for run in hit_runs:
            lines.append(
                f"- {run['label']}: {run['verify_ms_per_step'] + run['hit_wait_ms_per_hit']:.0f} ms against {run['verify_ms_per_step']:.0f} ms, "
                f"+{run['hit_step_overhead']:.1%}"
            )
    lines += ["", "Ratios (decode tokens/s, same run):", ""]
    for name, value in result["ratios"].items():
        lines.append(f"- {name}: {value:.2f}")
    lines += ["", f"Outputs identical across Saguaro modes: {result['outputs_identical']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="humaneval")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--modes",
        default="ar,sd,ssd,hf",
        help="comma-separated: ar, sd, ssd (adaptive fan-out), ssd-geometric, ssd-uniform, ssd-c<C> (rejection test, Saguaro factor C), "
        "hf (Hugging Face assisted generation); append -k<K> for K and -v<N> for a draft output layer over N token ids",
    )
    parser.add_argument(
        "--hardware",
        choices=["same-target", "same-total"],
        default="same-target",
        help="same-target: the target gets one core in every mode and the SSD draft the other; same-total: AR, SD and HF may use both cores",
    )
    parser.add_argument("--sd-k", type=int, default=4, help="K in SD mode")
    parser.add_argument("--ssd-k", type=int, default=4, help="K in SSD mode")
    parser.add_argument("--fanout-budget", type=int, default=8, help="MQ_LEN in SSD mode")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the Saguaro modes; Hugging Face assisted generation runs only at 0")
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="deploy the Saguaro modes at once and run each prompt through them in turn (needs memory for every mode's models); hf still runs last",
    )
    parser.add_argument("--name", default="", help="result file name (default: <prompt set>-<date>)")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from services.launcher import default_cpu_split
    from shared.config import Settings
    from shared.modeling import resolve_dtype

    settings = Settings()
    # The services resolve "auto" the same way on the CPU, so HF assisted generation runs in the dtype they serve.
    target_dtype = resolve_dtype(settings.dtype, torch.device("cpu"))
    prompts = load_prompt_ids(args.prompt_set, args.num_prompts)
    verify_cpus, draft_cpus = default_cpu_split()
    name = args.name or f"{args.prompt_set}-{time.strftime('%Y%m%d-%H%M')}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = ROOT / "logs" / "bench" / name
    started = time.time()

    runs = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.interleave:
        configs = [mode_settings(mode, args) for mode in modes if mode != "hf"]
        runs.extend(run_saguaro_interleaved(configs, prompts, args.max_tokens, log_dir, args.temperature))
        modes = [mode for mode in modes if mode == "hf"]
    for mode in modes:
        if mode == "hf":
            if args.temperature != 0.0:
                logger.warning("skipping Hugging Face assisted generation: it runs greedy only here")
                continue
            if args.hardware == "same-total":
                runs.append(run_hf_assisted(settings.target_model, settings.draft_model, prompts, args.max_tokens, "0-1", target_dtype, threads=2))
            else:
                runs.append(run_hf_assisted(settings.target_model, settings.draft_model, prompts, args.max_tokens, verify_cpus, target_dtype))
            continue
        label, env = mode_settings(mode, args)
        runs.append(run_saguaro_mode(label, env, prompts, args.max_tokens, log_dir, args.temperature))

    first = {}
    for run in runs:
        first.setdefault(run["label"].split()[0].split("-")[0], run)
    ratios = {}
    for run in runs:
        label = run["label"]
        if not label.startswith(("ssd", "sd")):
            continue
        for other in ("ar", "sd", "hf"):
            base = first.get(other)
            if base is None or base is run or (label.startswith("sd") and other != "ar"):
                continue
            if other == "hf":
                ratios[f"{label} / {base['label']} (end to end)"] = run["tokens_per_s"] / base["tokens_per_s"]
            else:
                ratios[f"{label} / {base['label']}"] = run["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    saguaro_outputs = [[r["tokens"] for r in run["requests"]] for run in runs if run["label"] != "hf-assisted"]
    result = {
        "name": name,
        "command": command_line("bench.run_bench", argv),
        "machine": machine_description(),
        "placement": (
            f"verify on CPU {verify_cpus or 'any'}, draft on CPU {draft_cpus or 'any'}, one torch thread each; HF assisted on CPU {verify_cpus or 'any'}"
            if args.hardware == "same-target"
            else "same total hardware: AR, SD and HF assisted use both cores with two threads; SSD runs verify on one core and the draft on the other"
        ),
        "prompt_set": args.prompt_set,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "target_model": settings.target_model,
        "target_dtype": target_dtype,
        "draft_model": settings.draft_model,
        "draft_precision": "int8 dynamic quantization" if settings.draft_quantization == "int8" else target_dtype,
        "interleaved": args.interleave,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "runs": runs,
        "ratios": ratios,
        "outputs_identical": all(outputs == saguaro_outputs[0] for outputs in saguaro_outputs) if saguaro_outputs else None,
    }
    write_results(out_dir, name, result, render_markdown(result))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
