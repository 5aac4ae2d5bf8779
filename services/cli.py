"""The ``saguaro`` command: serve, demo, generate and bench-client."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

logger = logging.getLogger("saguaro.cli")

DEMO_PROMPTS = Path(__file__).resolve().parent.parent / "bench" / "data" / "humaneval.jsonl"


def _stack_env(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    for name in ("mode", "dtype", "target_model", "draft_model", "num_speculative_tokens"):
        value = getattr(args, name, None)
        if value is not None:
            env["SAGUARO_" + name.upper()] = str(value)
    return env


def _ensure_default_models(env: dict[str, str]) -> None:
    """Build the default Qwen pair unless the settings point at other model directories."""
    from shared.config import Settings
    from shared.model_store import DRAFT_MODEL, TARGET_MODEL, ensure_model

    settings = Settings(**{k[len("SAGUARO_"):].lower(): v for k, v in env.items()})
    for name, path in ((TARGET_MODEL, settings.target_model), (DRAFT_MODEL, settings.draft_model)):
        if not (Path(path) / "config.json").is_file() and Path(path).name == name:
            ensure_model(name, Path(path).parent)


def serve_main(argv: list[str]) -> int:
    from services.launcher import Stack
    from shared.config import Settings

    parser = argparse.ArgumentParser(prog="saguaro serve", description="Start Redis (if needed) and the draft, verify and gateway services; stop them on Ctrl-C.")
    _add_stack_flags(parser)
    args = parser.parse_args(argv)
    env = _stack_env(args)
    _ensure_default_models(env)
    stack = Stack(env=env, log_dir=Path(args.log_dir), gateway_port=args.port)
    stack.start()
    print(f"Saguaro is serving on {stack.base_url} (OpenAI API under /v1); logs in {args.log_dir}. Press Ctrl-C to stop.", flush=True)
    grpc_port = Settings().grpc_port
    if grpc_port:
        print(f"  gRPC API on port {grpc_port}", flush=True)
    for name in stack.processes:
        print(f"  {name}: metrics at {stack.metrics_url(name)}", flush=True)
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stopping:
            for name, process in stack.processes.items():
                if process.poll() is not None:
                    print(f"{name} service exited with code {process.returncode}; see {args.log_dir}/{name}.log", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
    finally:
        print("stopping services", flush=True)
        stack.stop()
        print("services stopped", flush=True)
    return 0


def _add_stack_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=["ar", "sd", "ssd"], help="decoding mode (default: ssd)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="model dtype (default: auto, bfloat16 where the GPU or CPU computes it natively, else float32)",
    )
    parser.add_argument("--target-model", help="target model directory (default: the Qwen2.5-Coder-1.5B-Instruct build)")
    parser.add_argument("--draft-model", help="draft model directory (default: the Qwen2.5-Coder-0.5B-Instruct build)")
    parser.add_argument("--num-speculative-tokens", type=int, help="K, draft tokens per step")
    parser.add_argument("--port", type=int, default=int(os.environ.get("SAGUARO_GATEWAY_PORT", 8000)), help="gateway HTTP port")
    parser.add_argument("--log-dir", default="logs", help="directory of the service logs")


def demo_main(argv: list[str]) -> int:
    import httpx

    from services.launcher import Stack

    parser = argparse.ArgumentParser(prog="saguaro demo", description="Serve the models and answer HumanEval prompts through the gateway, with measured speed.")
    _add_stack_flags(parser)
    parser.add_argument("--num-prompts", type=int, default=3, help="HumanEval prompts to answer")
    parser.add_argument("--max-tokens", type=int, default=128, help="completion tokens per prompt")
    args = parser.parse_args(argv)
    env = _stack_env(args)
    _ensure_default_models(env)
    prompts = [json.loads(line) for line in DEMO_PROMPTS.read_text().splitlines()][: args.num_prompts]

    print(f"starting the services (logs in {args.log_dir}) ...", flush=True)
    with Stack(env=env, log_dir=Path(args.log_dir), gateway_port=args.port) as stack:
        print(f"serving on {stack.base_url}", flush=True)
        with httpx.Client(base_url=stack.base_url, timeout=900) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            for row in prompts:
                started = time.perf_counter()
                response = client.post(
                    "/v1/completions",
                    json={"model": model, "prompt": row["prompt"], "max_tokens": args.max_tokens, "temperature": 0},
                )
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    print(f"error: the gateway returned {response.status_code} for {row['task_id']}: {response.text}", file=sys.stderr)
                    print(f"see the service logs in {args.log_dir} for the cause", file=sys.stderr)
                    return 1
                body = response.json()
                _print_demo_result(row["task_id"], row["prompt"], body, elapsed)
    return 0


def _print_demo_result(task_id: str, prompt: str, body: dict, elapsed: float) -> None:
    text = body["choices"][0]["text"]
    usage = body["usage"]
    stats = body.get("saguaro") or {}
    print("=" * 78)
    print(f"{task_id}  ({usage['prompt_tokens']} prompt tokens)")
    print("-" * 78)
    print(prompt.rstrip("\n"))
    print("-" * 30 + " completion " + "-" * 36)
    print(text)
    print("-" * 78)
    line = f"{usage['completion_tokens']} tokens in {elapsed:.1f} s"
    if stats:
        speed = stats.get("decode_tokens_per_s")
        # None when every token came in the first step.
        line += f" | decode {speed:.2f} tokens/s" if speed is not None else " | decode speed not measured"
        line += (
            f" | mode {stats.get('mode')}"
            f" | mean acceptance length {stats.get('mean_acceptance_length', 0):.2f}"
        )
        if stats.get("mode") == "ssd":
            line += f" | cache hit rate {stats.get('cache_hit_rate', 0):.0%}"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": serve_main,
        "demo": demo_main,
        "generate": lambda rest: _client("generate_main", rest),
        "bench-client": lambda rest: _client("bench_client_main", rest),
    }
    usage = (
        "usage: saguaro {serve,demo,generate,bench-client} [options]\n"
        "  serve         start Redis (if needed) and the three services\n"
        "  demo          serve the models and answer HumanEval prompts with measured speed\n"
        "  generate      stream a completion from a running gateway\n"
        "  bench-client  drive a running gateway with concurrent requests\n"
        "Run `saguaro COMMAND --help` for a command's options."
    )
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in commands:
        if argv:
            print(f"saguaro: unknown command {argv[0]!r}", file=sys.stderr)
        print(usage, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return commands[argv[0]](argv[1:]) or 0


def _client(function: str, argv: list[str]) -> int:
    from services import client

    return getattr(client, function)(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
