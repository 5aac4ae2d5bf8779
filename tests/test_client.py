"""``saguaro generate`` and ``saguaro bench-client`` against a gateway served by uvicorn with a fake worker."""

from __future__ import annotations

import json

import pytest

from services.client import bench_client_main, generate_main, load_prompts, percentile
from tests.gateway_fakes import (  # noqa: F401  (fixtures are used by name)
    SCRIPT,
    FakeVerifyWorker,
    UvicornThread,
    gateway_factory,
    tiny_model_dir,
    tiny_tokenizer,
)

pytestmark = pytest.mark.timeout(120)


def script_text(start: int, count: int) -> str:
    return " ".join(SCRIPT[(start + i) % len(SCRIPT)] for i in range(count))


@pytest.fixture
def live_gateway(gateway_factory, tiny_tokenizer):
    """Return ``start(settings_overrides, **worker_options) -> (url, worker)``, which serves a gateway with uvicorn and a fake worker."""
    stack = []

    def start(settings_overrides=None, **worker_options):
        settings, app = gateway_factory(**(settings_overrides or {}))
        server = UvicornThread(app).__enter__()
        worker = FakeVerifyWorker(settings, tiny_tokenizer, **worker_options).__enter__()
        stack.append((server, worker))
        return server.url, worker

    yield start
    for server, worker in stack:
        worker.__exit__(None, None, None)
        server.__exit__(None, None, None)


def test_generate_streams_text(live_gateway, capsys):
    url, worker = live_gateway()
    status = generate_main(["hello world", "--url", url, "--max-tokens", "6", "--temperature", "0"])
    output = capsys.readouterr()
    assert status == 0
    assert output.out == script_text(0, 6) + "\n"
    assert "finish_reason=length" in output.err
    assert "completion_tokens=6" in output.err
    assert worker.requests[0].sampling.max_tokens == 6


def test_generate_chat_with_api_key(live_gateway, capsys, tiny_tokenizer):
    url, worker = live_gateway({"api_keys": ["cli-key"]})
    status = generate_main(["hello", "--url", url, "--chat", "--max-tokens", "3", "--api-key", "cli-key", "--seed", "5"])
    output = capsys.readouterr()
    assert status == 0
    assert output.out == script_text(0, 3) + "\n"
    assert worker.requests[0].sampling.seed == 5
    rendered = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False)
    assert worker.requests[0].prompt_token_ids == tiny_tokenizer.encode(rendered, add_special_tokens=False)

    status = generate_main(["hello", "--url", url, "--max-tokens", "3"])
    output = capsys.readouterr()
    assert status == 1
    assert "HTTP 401" in output.err
    assert "cli-key" not in output.err


def test_generate_reports_invalid_request(live_gateway, capsys):
    url, _worker = live_gateway()
    status = generate_main(["hello", "--url", url, "--temperature", "5"])
    output = capsys.readouterr()
    assert status == 1
    assert "HTTP 400" in output.err
    assert "temperature" in output.err


def test_bench_client_uses_usage_counts(live_gateway, tmp_path, capsys):
    # Two tokens per SSE chunk, so counting chunks would report half the tokens.
    url, worker = live_gateway(tokens_per_event=2)
    result_path = tmp_path / "bench.json"
    status = bench_client_main(
        ["--url", url, "--concurrency", "3", "--num-requests", "7", "--max-tokens", "6", "--json", str(result_path)]
    )
    output = capsys.readouterr().out
    assert status == 0
    assert "7 / 7 (0 failed)" in output
    assert "TTFT" in output
    assert "TPOT" in output
    assert "tokens/s" in output

    result = json.loads(result_path.read_text())
    summary = result["summary"]
    assert summary["completed"] == 7
    assert summary["failed"] == 0
    assert summary["total_completion_tokens"] == 42
    assert summary["output_tokens_per_s"] == pytest.approx(42 / summary["duration_s"])
    assert summary["ttft_s"]["p50"] > 0
    assert summary["tpot_s"]["mean"] > 0
    assert len(result["requests"]) == 7
    assert all(record["completion_tokens"] == 6 for record in result["requests"])
    assert len(worker.requests) == 7
    assert all(request.sampling.max_tokens == 6 for request in worker.requests)


def test_bench_client_prompts_file_and_ignore_eos(live_gateway, tmp_path, capsys, tiny_tokenizer):
    url, worker = live_gateway(eos_after=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe cat\n")
    status = bench_client_main(
        ["--url", url, "--num-requests", "4", "--max-tokens", "5", "--prompts-file", str(prompts), "--json", str(tmp_path / "a.json")]
    )
    capsys.readouterr()
    assert status == 0
    assert json.loads((tmp_path / "a.json").read_text())["summary"]["total_completion_tokens"] == 4 * 3  # two tokens and EOS
    assert {tuple(request.prompt_token_ids) for request in worker.requests} == {
        tuple(tiny_tokenizer.encode("hello world")),
        tuple(tiny_tokenizer.encode("the cat")),
    }

    worker.requests.clear()
    status = bench_client_main(
        ["--url", url, "--num-requests", "2", "--max-tokens", "5", "--ignore-eos", "--chat", "--json", str(tmp_path / "b.json")]
    )
    capsys.readouterr()
    assert status == 0
    assert json.loads((tmp_path / "b.json").read_text())["summary"]["total_completion_tokens"] == 10
    assert all(request.sampling.ignore_eos for request in worker.requests)


def test_bench_client_counts_failures(live_gateway, capsys):
    url, _worker = live_gateway({"max_tokens_limit": 4})
    status = bench_client_main(["--url", url, "--num-requests", "2", "--max-tokens", "8"])
    output = capsys.readouterr().out
    assert status == 1
    assert "0 / 2 (2 failed)" in output
    assert "max_tokens" in output


def test_load_prompts_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a\\nb"}\n{"prompt": "c"}\n')
    assert load_prompts(jsonl) == ["a\nb", "c"]
    text = tmp_path / "p.txt"
    text.write_text("line one\\nline two\n")
    assert load_prompts(text) == ["line one\nline two"]
    assert len(load_prompts(None)) >= 4
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        load_prompts(empty)


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 3.0], 100) == 3.0


def test_cli_help_exits_zero(capsys):
    from services.cli import main

    assert main(["--help"]) == 0
    output = capsys.readouterr()
    assert "usage: saguaro" in output.out
    assert output.err == ""


def test_cli_unknown_command_exits_two(capsys):
    from services.cli import main

    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("speed", [12.5, None])
def test_demo_result_marks_completion(speed, capsys):
    from services.cli import _print_demo_result

    body = {
        "choices": [{"text": "    return a + b\n"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 6},
        "saguaro": {"mode": "ssd", "decode_tokens_per_s": speed, "mean_acceptance_length": 3.0, "cache_hit_rate": 0.5},
    }
    _print_demo_result("HumanEval/0", "def add(a, b):\n", body, elapsed=1.5)
    lines = capsys.readouterr().out.splitlines()
    marker = next(i for i, line in enumerate(lines) if "completion" in line and line.startswith("---"))
    assert lines[marker - 1] == "def add(a, b):"
    assert lines[marker + 1] == "    return a + b"
    summary = lines[-1]
    assert summary.startswith("6 tokens in 1.5 s")
    assert ("decode 12.50 tokens/s" if speed else "decode speed not measured") in summary
    assert "cache hit rate 50%" in summary
