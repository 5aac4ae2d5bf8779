"""How long a running stream stalls while a long prompt is prefilled, by prefill chunk size.

For each chunk size one deployment (draft and verify services as separate
processes, target on one core, draft on the other) decodes a short request.
Once it streams, a request with a long prompt arrives. The benchmark records
the running request's longest gap between two token events while the long
prompt is prefilled, its median gap outside that window, and the long
request's time to first token. A chunk size of at least the prompt length
prefills the prompt in one forward, as the services did before chunked prefill.

Writes ``bench/results/<name>.json`` and ``bench/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path

from bench.run_bench import ROOT, command_line, load_prompt_ids, machine_description, write_results

logger = logging.getLogger("saguaro.bench")


def stream_times_ms(client, namespace: str, request_id: str) -> list[int]:
    """Return the Redis timestamps, in ms, of a request's token events."""
    from shared import keys

    return [int(entry_id.split(b"-")[0]) for entry_id, _ in client.xrange(keys.events(namespace, request_id))]


def run_chunk_size(chunk: int, running_prompt: list[int], long_prompt: list[int], args, log_dir: Path) -> dict:
    import redis

    from bench.direct_client import collect, generate, submit
    from services.launcher import Stack

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    env = {
        "SAGUARO_NAMESPACE": namespace,
        "SAGUARO_MODE": args.mode,
        "SAGUARO_DTYPE": args.dtype,
        "SAGUARO_PREFILL_CHUNK_SIZE": str(chunk),
        "SAGUARO_MAX_MODEL_LEN": str(len(long_prompt) + 256),
    }
    with Stack(env=env, services=("draft", "verify"), log_dir=log_dir / f"chunk-{chunk}", start_timeout_s=600) as stack:
        client = redis.Redis.from_url(stack.redis_url)
        generate(client, namespace, running_prompt[:8], temperature=0.0, max_tokens=2, ignore_eos=True, timeout_s=600)
        running = submit(client, namespace, running_prompt, temperature=0.0, max_tokens=args.running_tokens, ignore_eos=True)
        first = collect_first_event(client, namespace, running)
        seconds, micros = client.time()
        submitted_ms = seconds * 1000 + micros // 1000
        long_id = submit(client, namespace, long_prompt, temperature=0.0, max_tokens=args.long_tokens, ignore_eos=True)
        long_result = collect(client, namespace, long_id, timeout_s=3600)
        running_result = collect(client, namespace, running, timeout_s=3600)
        if long_result.finish is None or running_result.finish is None:
            raise RuntimeError(f"a request failed: {long_result.error or running_result.error}")
        running_ms = stream_times_ms(client, namespace, running)
        long_first_ms = stream_times_ms(client, namespace, long_id)[0]
    logger.info("chunk %d: the running request streamed its first token after %.1f s", chunk, first)
    gaps_in = [b - a for a, b in zip(running_ms, running_ms[1:]) if b > submitted_ms and a < long_first_ms]
    gaps_out = [b - a for a, b in zip(running_ms, running_ms[1:]) if b <= submitted_ms or a >= long_first_ms]
    if running_ms[-1] < long_first_ms:
        logger.warning("chunk %d: the running request finished before the long prompt's first token; raise --running-tokens", chunk)
    return {
        "chunk": chunk,
        "max_gap_during_prefill_s": max(gaps_in) / 1000 if gaps_in else None,
        "events_during_prefill": sum(1 for ms in running_ms if submitted_ms < ms < long_first_ms),
        "median_gap_otherwise_s": statistics.median(gaps_out) / 1000 if gaps_out else None,
        "long_ttft_s": (long_first_ms - submitted_ms) / 1000,
        "running_finished_after_prefill": running_ms[-1] > long_first_ms,
        "running_tokens": running_result.token_ids,
        "long_tokens": long_result.token_ids,
    }


def collect_first_event(client, namespace: str, request_id: str, timeout_s: float = 600.0) -> float:
    """Wait until a request has streamed its first token event; return the seconds waited."""
    from shared import keys

    started = time.monotonic()
    while not client.xlen(keys.events(namespace, request_id)):
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"request {request_id} streamed nothing in {timeout_s:.0f} s")
        time.sleep(0.01)
    return time.monotonic() - started


def render_markdown(result: dict) -> str:
    lines = [
        f"# Benchmark {result['name']}: stream stalls during a long prefill",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- mode {result['mode']}, dtype {result['dtype']}; verify on CPU 0, draft on CPU 1, one torch thread each",
        f"- running request: {result['running_prompt_tokens']}-token HumanEval prompt, {result['running_tokens']} tokens; "
        f"long request: {result['long_prompt_tokens']}-token prompt (HumanEval prompts joined), {result['long_tokens']} tokens; greedy",
        f"- started {result['started']}, took {result['elapsed_s'] / 60:.1f} min",
        "",
        "| prefill chunk | longest gap in the running stream during the prefill, s | its token events during the prefill | its median gap otherwise, s | long request's time to first token, s |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        gap = row["max_gap_during_prefill_s"]
        median = row["median_gap_otherwise_s"]
        lines.append(
            f"| {row['chunk']} | {'-' if gap is None else f'{gap:.2f}'} | {row['events_during_prefill']} | "
            f"{'-' if median is None else f'{median:.2f}'} | {row['long_ttft_s']:.2f} |"
        )
    lines += [
        "",
        f"Outputs identical across chunk sizes: {result['outputs_identical']} (not guaranteed: another split of the prompt "
        "rounds its KV differently, which can flip a near-tied greedy token)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.prefill_stall", description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="256,4096", help="comma-separated prefill chunk sizes; one at least the long prompt's length prefills it whole")
    parser.add_argument("--long-prompt-tokens", type=int, default=1024)
    parser.add_argument("--long-tokens", type=int, default=8, help="tokens the long request generates")
    parser.add_argument("--running-tokens", type=int, default=96, help="tokens the running request generates; enough to outlast the prefill")
    parser.add_argument("--mode", default="ssd", choices=["ar", "sd", "ssd"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="SAGUARO_DTYPE of both services")
    parser.add_argument("--name", default="prefill-stall")
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from shared.modeling import resolve_dtype

    prompts = load_prompt_ids("humaneval", 40)
    joined = [token for prompt in prompts[1:] for token in prompt]
    if len(joined) < args.long_prompt_tokens:
        parser.error(f"--long-prompt-tokens {args.long_prompt_tokens} is more than the {len(joined)} tokens of the joined prompts")
    long_prompt = joined[: args.long_prompt_tokens]
    started = time.time()
    rows = [
        run_chunk_size(int(chunk), prompts[0], long_prompt, args, ROOT / "logs" / "bench" / args.name)
        for chunk in args.chunks.split(",")
        if chunk.strip()
    ]
    result = {
        "name": args.name,
        "command": command_line("bench.prefill_stall", argv),
        "machine": machine_description(),
        "mode": args.mode,
        "dtype": resolve_dtype(args.dtype, torch.device("cpu")),
        "running_prompt_tokens": len(prompts[0]),
        "running_tokens": args.running_tokens,
        "long_prompt_tokens": len(long_prompt),
        "long_tokens": args.long_tokens,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "elapsed_s": time.time() - started,
        "rows": rows,
        "outputs_identical": all(
            row["running_tokens"] == rows[0]["running_tokens"] and row["long_tokens"] == rows[0]["long_tokens"] for row in rows
        ),
    }
    write_results(Path(args.out_dir), args.name, result, render_markdown(result))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
