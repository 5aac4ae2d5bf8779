"""Command-line clients of the gateway: ``saguaro generate`` and ``saguaro bench-client``.

``generate_main`` streams one completion to the terminal. ``bench_client_main``
sends many streaming requests at a fixed concurrency and reports time to first
token (TTFT), time per output token (TPOT) and throughput. Token counts come
from the ``usage`` the server reports in the final stream chunk
(``stream_options.include_usage``), never from the number of SSE chunks,
because one chunk can carry several tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = os.environ.get("SAGUARO_GATEWAY_URL", "http://127.0.0.1:8000")

BUILTIN_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain the difference between a process and a thread in two paragraphs.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Summarize what a hash map is and when its lookups become slow.",
    "Write a bash one-liner that counts the lines of all .py files in a directory tree.",
    "class Stack:\n    \"\"\"A last-in, first-out stack backed by a list.\"\"\"\n",
    "Give three test cases for a function that parses ISO 8601 dates, with expected results.",
]


class GatewayRequestError(Exception):
    """The gateway returned an error status or an error event."""


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error_message(response_text: str, status_code: int) -> str:
    try:
        error = json.loads(response_text)["error"]
        return f"HTTP {status_code}: {error.get('message')} (param: {error.get('param')})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status_code}: {response_text[:500]}"


_DONE = object()


def _parse_sse_line(line: str) -> dict | object | None:
    """Return the JSON payload of a ``data:`` line, ``_DONE`` for ``[DONE]``, or None for other lines.

    Raises ``GatewayRequestError`` for an error event.
    """
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return _DONE
    payload = json.loads(data)
    if "error" in payload:
        raise GatewayRequestError(payload["error"].get("message", str(payload["error"])))
    return payload


def _sse_payloads(lines: Iterator[str]) -> Iterator[dict]:
    """Yield the JSON payloads of an SSE response until ``[DONE]``."""
    for line in lines:
        payload = _parse_sse_line(line)
        if payload is _DONE:
            return
        if payload is not None:
            yield payload


def _chunk_text(chunk: dict, chat: bool) -> str:
    texts = []
    for choice in chunk.get("choices", []):
        if chat:
            texts.append(choice.get("delta", {}).get("content") or "")
        else:
            texts.append(choice.get("text") or "")
    return "".join(texts)


def _request_body(args: argparse.Namespace, prompt: str, *, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.model:
        body["model"] = args.model
    if getattr(args, "seed", None) is not None:
        body["seed"] = args.seed
    if getattr(args, "ignore_eos", False):
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _endpoint(url: str, chat: bool) -> str:
    return url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")


# saguaro generate


def generate_main(argv: list[str] | None = None) -> int:
    """Stream one completion from the gateway to stdout, print usage and timing to stderr, and return the exit status."""
    parser = argparse.ArgumentParser(prog="saguaro generate", description="Stream a completion from a running gateway.")
    parser.add_argument("prompt", help="prompt text; with --chat, the user message")
    parser.add_argument("--url", default=DEFAULT_URL, help="gateway base URL (default: %(default)s, or $SAGUARO_GATEWAY_URL)")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions with the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=256, help="maximum number of generated tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: chosen by the server)")
    parser.add_argument("--model", default=None, help="model id to request (default: the served model)")
    parser.add_argument("--api-key", default=os.environ.get("SAGUARO_API_KEY"), help="Bearer API key (default: $SAGUARO_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout, seconds (default: %(default)s)")
    args = parser.parse_args(argv)

    body = _request_body(args, args.prompt, chat=args.chat)
    started = time.perf_counter()
    first_token_at = None
    usage: dict | None = None
    finish_reasons: list[str] = []
    try:
        with httpx.stream(
            "POST", _endpoint(args.url, args.chat), json=body, headers=_headers(args.api_key), timeout=args.timeout
        ) as response:
            if response.status_code != 200:
                response.read()
                print(f"error: {_error_message(response.text, response.status_code)}", file=sys.stderr)
                return 1
            for chunk in _sse_payloads(response.iter_lines()):
                text = _chunk_text(chunk, args.chat)
                if text:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    sys.stdout.write(text)
                    sys.stdout.flush()
                for choice in chunk.get("choices", []):
                    if choice.get("finish_reason"):
                        finish_reasons.append(choice["finish_reason"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as exc:
        print(f"\nerror: request to {args.url} failed: {exc}", file=sys.stderr)
        return 1
    except GatewayRequestError as exc:
        print(f"\nerror: the gateway reported: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    summary = f"finish_reason={','.join(finish_reasons) or 'none'} elapsed={elapsed:.2f}s"
    if first_token_at is not None:
        summary += f" ttft={first_token_at - started:.3f}s"
    if usage:
        completion_tokens = usage.get("completion_tokens", 0)
        summary += f" prompt_tokens={usage.get('prompt_tokens')} completion_tokens={completion_tokens}"
        if elapsed > 0:
            summary += f" tokens/s={completion_tokens / elapsed:.1f}"
    print(f"[{summary}]", file=sys.stderr)
    return 0


# saguaro bench-client


@dataclass
class RequestRecord:
    """Outcome of one benchmark request, with times in seconds."""

    prompt_index: int
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float = 0.0


@dataclass
class BenchSummary:
    num_requests: int
    concurrency: int
    max_tokens: int
    completed: int
    failed: int
    duration_s: float
    total_prompt_tokens: int
    total_completion_tokens: int
    request_throughput_per_s: float
    output_tokens_per_s: float
    ttft_s: dict[str, float] = field(default_factory=dict)
    tpot_s: dict[str, float] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def load_prompts(path: Path | None) -> list[str]:
    """Read prompts from a file: JSON Lines with a "prompt" field, or plain text with one prompt per line."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompts.append(json.loads(line)["prompt"])
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"{path}:{number}: expected a JSON object with a 'prompt' field ({exc})") from exc
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise SystemExit(f"{path} contains no prompts")
    return prompts


async def _run_one(client: httpx.AsyncClient, args: argparse.Namespace, prompt_index: int, prompt: str) -> RequestRecord:
    record = RequestRecord(prompt_index=prompt_index)
    body = _request_body(args, prompt, chat=args.chat)
    started = time.perf_counter()
    first_token_at = None
    last_token_at = None
    usage = None
    try:
        async with client.stream("POST", _endpoint(args.url, args.chat), json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise GatewayRequestError(_error_message(response.text, response.status_code))
            async for chunk in _async_sse_payloads(response.aiter_lines()):
                if _chunk_text(chunk, args.chat):
                    now = time.perf_counter()
                    first_token_at = first_token_at or now
                    last_token_at = now
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (httpx.HTTPError, GatewayRequestError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        record.latency_s = time.perf_counter() - started
        return record

    finished = time.perf_counter()
    record.latency_s = finished - started
    if usage is None:
        record.error = "the response had no usage chunk; the server must support stream_options.include_usage"
        return record
    record.ok = True
    record.prompt_tokens = int(usage.get("prompt_tokens", 0))
    record.completion_tokens = int(usage.get("completion_tokens", 0))
    if first_token_at is not None:
        record.ttft_s = first_token_at - started
        if record.completion_tokens > 1:
            # TPOT covers the tokens after the first, and the last text chunk marks the end of decoding.
            record.tpot_s = ((last_token_at or finished) - first_token_at) / (record.completion_tokens - 1)
    return record


async def _async_sse_payloads(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    async for line in lines:
        payload = _parse_sse_line(line)
        if payload is _DONE:
            return
        if payload is not None:
            yield payload


async def run_benchmark(args: argparse.Namespace, prompts: list[str]) -> tuple[BenchSummary, list[RequestRecord]]:
    semaphore = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(headers=_headers(args.api_key), timeout=args.timeout, limits=limits) as client:

        async def bounded(index: int) -> RequestRecord:
            async with semaphore:
                prompt_index = index % len(prompts)
                return await _run_one(client, args, prompt_index, prompts[prompt_index])

        started = time.perf_counter()
        records = await asyncio.gather(*(bounded(index) for index in range(args.num_requests)))
        duration_s = time.perf_counter() - started

    succeeded = [record for record in records if record.ok]
    completion_tokens = sum(record.completion_tokens for record in succeeded)
    errors = sorted({record.error for record in records if not record.ok})
    summary = BenchSummary(
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        completed=len(succeeded),
        failed=len(records) - len(succeeded),
        duration_s=duration_s,
        total_prompt_tokens=sum(record.prompt_tokens for record in succeeded),
        total_completion_tokens=completion_tokens,
        request_throughput_per_s=len(succeeded) / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=completion_tokens / duration_s if duration_s > 0 else 0.0,
        ttft_s=_distribution([r.ttft_s for r in succeeded if r.ttft_s is not None]),
        tpot_s=_distribution([r.tpot_s for r in succeeded if r.tpot_s is not None]),
        latency_s=_distribution([r.latency_s for r in succeeded]),
        errors=errors[:20],
    )
    return summary, list(records)


def format_summary(summary: BenchSummary) -> str:
    lines = [
        f"{'requests completed':<28}{summary.completed} / {summary.num_requests} ({summary.failed} failed)",
        f"{'concurrency':<28}{summary.concurrency}",
        f"{'duration':<28}{summary.duration_s:.2f} s",
        f"{'prompt tokens':<28}{summary.total_prompt_tokens}",
        f"{'completion tokens':<28}{summary.total_completion_tokens}",
        f"{'request throughput':<28}{summary.request_throughput_per_s:.2f} req/s",
        f"{'output throughput':<28}{summary.output_tokens_per_s:.1f} tokens/s",
        "",
        f"{'metric (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for name, distribution in (("TTFT", summary.ttft_s), ("TPOT", summary.tpot_s), ("latency", summary.latency_s)):
        if distribution:
            cells = "".join(f"{distribution[key] * 1000:>10.1f}" for key in ("mean", "p50", "p90", "p99", "max"))
        else:
            cells = f"{'n/a':>10}" * 5
        lines.append(f"{name:<14}{cells}")
    for error in summary.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def bench_client_main(argv: list[str] | None = None) -> int:
    """Benchmark a running gateway, print a table and optionally write JSON. Return 1 if any request failed."""
    parser = argparse.ArgumentParser(
        prog="saguaro bench-client",
        description="Send concurrent streaming requests to a running gateway and report TTFT, TPOT and throughput.",
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="gateway base URL (default: %(default)s, or $SAGUARO_GATEWAY_URL)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at the same time (default: %(default)s)")
    parser.add_argument("--num-requests", type=int, default=32, help="total number of requests (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed of every request (default: chosen by the server)")
    parser.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help="prompts, one per line (\\n escapes a newline) or JSON Lines with a 'prompt' field; default: built-in prompts",
    )
    parser.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens even after EOS")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions instead of /v1/completions")
    parser.add_argument("--model", default=None, help="model id to request (default: the served model)")
    parser.add_argument("--api-key", default=os.environ.get("SAGUARO_API_KEY"), help="Bearer API key (default: $SAGUARO_API_KEY)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request HTTP timeout, seconds (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary and every request's record to this JSON file")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.num_requests < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --num-requests and --max-tokens must be at least 1")

    prompts = load_prompts(args.prompts_file)
    summary, records = asyncio.run(run_benchmark(args, prompts))
    print(format_summary(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "url": args.url,
            "chat": args.chat,
            "ignore_eos": args.ignore_eos,
            "temperature": args.temperature,
            "summary": asdict(summary),
            "requests": [asdict(record) for record in records],
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if summary.failed == 0 else 1
