"""Test doubles for the gateway tests: a tiny tokenizer, a fake verify worker and a uvicorn thread.

The fake worker replaces the verify service. It reads the request stream
through the consumer group ``verify`` and writes heartbeats for a verify and
(optionally) a draft replica. Each request gets token events of a fixed word
script, decoded by the tiny tokenizer, then a ``FinishEvent``. Like verify, it
checks the cancel key before every step.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import uvicorn

from shared import keys
from shared.config import Settings
from shared.protocol import (
    DecodeStats,
    ErrorEvent,
    FinishEvent,
    GenerateRequest,
    ReplicaInfo,
    TokenEvent,
    TokenLogprob,
    Usage,
    decode,
    encode,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
MODEL_NAME = "tiny-test-model"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "hello world the a is of and to in this that test one two three four five six seven eight nine ten "
    "red green blue cat dog sun moon tree river stone ! . , ?"
).split()
# The fake worker generates this script, starting at position seed % len for temperature > 0.
SCRIPT = "one two three four five six seven eight nine ten red green blue cat dog sun moon tree river stone".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(directory: Path) -> Path:
    """Save a whitespace word-level tokenizer with a chat template and a config.json to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(vocab)}))
    return directory


def make_settings(model_dir: Path, **overrides) -> Settings:
    values = dict(
        redis_url=REDIS_URL,
        namespace=f"test-{uuid.uuid4().hex[:12]}",
        target_model=str(model_dir),
        served_model_name=MODEL_NAME,
        max_model_len=128,
        max_tokens_limit=100,
        grpc_port=0,
        api_keys=[],
    )
    values.update(overrides)
    return Settings(**values)


def delete_namespace(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = list(client.scan_iter(match=f"{namespace}:*", count=500))
        if names:
            client.delete(*names)
    finally:
        client.close()


class FakeVerifyWorker:
    """Fake verify service that serves gateway requests from Redis in background threads.

    ``behavior``: "generate" (default), "silent" (never responds, for timeouts)
    or "error" (responds with an ``ErrorEvent``). ``step_delay_s`` is the pause
    before each step of ``tokens_per_event`` tokens. ``eos_after`` makes the
    worker emit EOS after that many tokens unless the request sets ignore_eos.
    """

    def __init__(
        self,
        settings: Settings,
        tokenizer,
        *,
        verify_mode: str = "sd",
        with_draft: bool = True,
        behavior: str = "generate",
        step_delay_s: float = 0.0,
        tokens_per_event: int = 2,
        eos_after: int | None = None,
    ) -> None:
        self.namespace = settings.namespace
        self.tokenizer = tokenizer
        self.verify_mode = verify_mode
        self.with_draft = with_draft
        self.behavior = behavior
        self.step_delay_s = step_delay_s
        self.tokens_per_event = tokens_per_event
        self.eos_after = eos_after
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[str] = []
        self.redis = redis.Redis.from_url(REDIS_URL)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-verify")
        self.script_ids = [tokenizer.convert_tokens_to_ids(word) for word in SCRIPT]

    def __enter__(self) -> "FakeVerifyWorker":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self.write_heartbeats()
        for target in (self._heartbeat_loop, self._serve_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.redis.delete(keys.replica(self.namespace, "verify", "fake-verify"))
        self.redis.delete(keys.replica(self.namespace, "draft", "fake-draft"))
        self.redis.close()

    def write_heartbeats(self) -> None:
        verify = ReplicaInfo(role="verify", replica_id="fake-verify", mode=self.verify_mode, started_at=time.time())
        self.redis.set(keys.replica(self.namespace, "verify", "fake-verify"), encode(verify), ex=keys.REPLICA_TTL_S)
        if self.with_draft:
            draft = ReplicaInfo(role="draft", replica_id="fake-draft", started_at=time.time())
            self.redis.set(keys.replica(self.namespace, "draft", "fake-draft"), encode(draft), ex=keys.REPLICA_TTL_S)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(keys.HEARTBEAT_S):
            self.write_heartbeats()

    def _serve_loop(self) -> None:
        stream = keys.request_stream(self.namespace)
        try:
            self.redis.xgroup_create(stream, keys.REQUEST_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        while not self._stop.is_set():
            reply = self.redis.xreadgroup(keys.REQUEST_GROUP, "fake-verify", {stream: ">"}, count=16, block=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    request = decode(fields[b"msg"])
                    self.requests.append(request)
                    self._pool.submit(self._handle, entry_id, request)

    def _emit(self, request_id: str, message) -> None:
        events = keys.events(self.namespace, request_id)
        self.redis.xadd(events, {"msg": encode(message)})
        self.redis.expire(events, keys.EVENTS_TTL_S)

    def _is_cancelled(self, request_id: str) -> bool:
        return self.redis.get(keys.cancel(self.namespace, request_id)) is not None

    def _handle(self, entry_id: bytes, request: GenerateRequest) -> None:
        try:
            if self.behavior == "silent":
                return
            if self.behavior == "error":
                self._emit(request.request_id, ErrorEvent(request_id=request.request_id, message="fake engine failure"))
                return
            self._generate(request)
        finally:
            if self.behavior != "silent":
                self.redis.srem(keys.inflight(self.namespace), request.request_id)
            self.redis.xack(keys.request_stream(self.namespace), keys.REQUEST_GROUP, entry_id)

    def _generate(self, request: GenerateRequest) -> None:
        sampling = request.sampling
        start = 0 if sampling.temperature == 0 else sampling.seed % len(self.script_ids)
        eos_id = self.tokenizer.eos_token_id
        generated: list[int] = []
        text = ""
        finish_reason, stop_reason = "length", None
        while len(generated) < sampling.max_tokens:
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            if self._is_cancelled(request.request_id):
                self.cancelled.append(request.request_id)
                finish_reason = "abort"
                break
            step_ids = []
            for _ in range(self.tokens_per_event):
                if len(generated) + len(step_ids) >= sampling.max_tokens:
                    break
                position = len(generated) + len(step_ids)
                if self.eos_after is not None and position >= self.eos_after and not sampling.ignore_eos:
                    token_id = eos_id
                else:
                    token_id = self.script_ids[(start + position) % len(self.script_ids)]
                step_ids.append(token_id)
                if token_id == eos_id or token_id in sampling.stop_token_ids:
                    break
            ended_by_token = step_ids[-1] == eos_id or step_ids[-1] in sampling.stop_token_ids
            generated.extend(step_ids)
            visible = [t for t in generated if t != eos_id and t not in sampling.stop_token_ids]
            new_text = self.tokenizer.decode(visible)
            delta = new_text[len(text):]
            for stop in sampling.stop:
                if stop in new_text:
                    cut = new_text.index(stop)
                    delta = new_text[len(text):cut] if cut > len(text) else ""
                    finish_reason, stop_reason = "stop", stop
                    break
            logprobs = None
            if sampling.logprobs is not None:
                alternatives = self.script_ids[: sampling.logprobs]
                logprobs = [
                    TokenLogprob(token_id=t, logprob=-0.25, top={a: -0.25 - 0.5 * i for i, a in enumerate(alternatives)})
                    for t in step_ids
                ]
            self._emit(request.request_id, TokenEvent(request_id=request.request_id, token_ids=step_ids, text=delta, logprobs=logprobs))
            text += delta
            if finish_reason == "stop":
                break
            if ended_by_token:
                finish_reason = "stop"
                stop_reason = None if step_ids[-1] == eos_id else step_ids[-1]
                break
        self._emit(
            request.request_id,
            FinishEvent(
                request_id=request.request_id,
                finish_reason=finish_reason,
                stop_reason=stop_reason,
                usage=Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(generated)),
                stats=DecodeStats(mode=self.verify_mode),
            ),
        )


class UvicornThread:
    """Serves an ASGI app on 127.0.0.1 at a free port from a background thread."""

    def __init__(self, app) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "UvicornThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the uvicorn test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


def parse_sse(text: str) -> list[str]:
    """Return the data fields of an SSE body, in order (``[DONE]`` included)."""
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def wait_until(condition, timeout_s: float = 3.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return bool(condition())


# Fixtures. Test modules import them by name.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def gateway_factory(tiny_model_dir, tiny_tokenizer):
    """Return ``make(**settings_overrides) -> (settings, app)``. Each app gets a fresh namespace, deleted afterwards.

    ``load_tokenizer=True`` makes the app load the tokenizer from ``target_model`` itself.
    """
    from services.gateway.app import create_app

    namespaces = []

    def make(load_tokenizer: bool = False, **overrides):
        settings = make_settings(tiny_model_dir, **overrides)
        namespaces.append(settings.namespace)
        app = create_app(settings, tokenizer=None if load_tokenizer else tiny_tokenizer, readiness_cache_s=0)
        return settings, app

    yield make
    for namespace in namespaces:
        delete_namespace(namespace)
