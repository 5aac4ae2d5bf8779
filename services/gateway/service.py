"""Request handling shared by the REST and gRPC front ends.

``GenerationService.prepare_completion``/``prepare_chat`` validate a request
against the model and the gateway limits and build one ``GenerateRequest`` per
choice. ``run`` streams the engine events of all choices, and ``collect``
waits for the complete result. Nothing reaches Redis before ``prepare_*``
has accepted the request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

from shared.config import Settings
from shared.protocol import ErrorEvent, FinishEvent, GenerateRequest, SamplingParams, TokenEvent
from services.gateway.engine_client import ChoiceResult, EngineClient, EngineEvent
from services.gateway.errors import EngineFailed, InvalidRequest, ModelNotFound
from services.gateway.metrics import GatewayMetrics
from services.gateway.prompts import PromptProcessor
from services.gateway.schemas import MAX_SEED, ChatCompletionRequest, CompletionRequest, _SamplingFields

logger = logging.getLogger("saguaro.gateway")

# Client-provided request ids become part of Redis keys, so only these characters are accepted.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
RANDOM_SEED_LIMIT = 2**31


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(16)}"


def accept_request_id(client_value: str | None, prefix: str) -> tuple[str, bool]:
    """Return ``(request_id, from_client)``: the client's id when it is sane, else a new ``<prefix>-<hex>`` id."""
    if client_value and REQUEST_ID_PATTERN.match(client_value):
        return client_value, True
    return new_request_id(prefix), False


@dataclass
class PreparedGeneration:
    """A validated request, ready to be submitted as one engine request per choice."""

    request_id: str
    kind: Literal["completion", "chat"]
    model: str
    created: int
    prompt_token_ids: list[int]
    engine_requests: list[GenerateRequest]
    stream: bool
    include_usage: bool
    logprobs: int | None

    @property
    def max_tokens(self) -> int:
        return self.engine_requests[0].sampling.max_tokens

    @property
    def seed(self) -> int:
        return self.engine_requests[0].sampling.seed


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        engine: EngineClient,
        prompts: PromptProcessor,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.prompts = prompts
        self.metrics = metrics

    # Validation.

    async def prepare_completion(
        self, body: CompletionRequest, request_id: str, *, request_id_from_client: bool = False
    ) -> PreparedGeneration:
        self._check_model(body.model)
        prompt_token_ids = await self.prompts.encode_prompt(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        self._check_lengths(prompt_token_ids, max_tokens, prompt_param="prompt")
        return self._build(
            body, "completion", request_id, request_id_from_client, prompt_token_ids, max_tokens, body.logprobs
        )

    async def prepare_chat(
        self, body: ChatCompletionRequest, request_id: str, *, request_id_from_client: bool = False
    ) -> PreparedGeneration:
        self._check_model(body.model)
        prompt_token_ids = await self.prompts.encode_chat(body.messages)
        max_tokens = body.requested_max_tokens
        if max_tokens is None:
            # Like vLLM, an unset limit means the rest of the context window, capped by the gateway's limit.
            max_tokens = max(1, min(self.settings.max_model_len - len(prompt_token_ids), self.settings.max_tokens_limit))
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        self._check_lengths(prompt_token_ids, max_tokens, prompt_param="messages", max_tokens_param=param)
        return self._build(
            body, "chat", request_id, request_id_from_client, prompt_token_ids, max_tokens, body.engine_logprobs
        )

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_id:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.settings.model_id!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def _check_lengths(
        self, prompt_token_ids: list[int], max_tokens: int, *, prompt_param: str, max_tokens_param: str = "max_tokens"
    ) -> None:
        limit = self.settings.max_tokens_limit
        if max_tokens > limit:
            raise InvalidRequest(
                f"{max_tokens_param} is {max_tokens}, but this server allows at most {limit}; lower {max_tokens_param}",
                param=max_tokens_param,
            )
        context = self.settings.max_model_len
        prompt_tokens = len(prompt_token_ids)
        if prompt_tokens >= context:
            raise InvalidRequest(
                f"the prompt has {prompt_tokens} tokens, but the model's context length is {context} tokens "
                "including at least one generated token; shorten the prompt",
                param=prompt_param,
            )
        if prompt_tokens + max_tokens > context:
            raise InvalidRequest(
                f"the model's context length is {context} tokens, but {prompt_tokens + max_tokens} were requested "
                f"({prompt_tokens} in the prompt and {max_tokens} for the completion); "
                f"lower {max_tokens_param} to at most {context - prompt_tokens} or shorten the prompt",
                param=max_tokens_param,
            )

    def _build(
        self,
        body: _SamplingFields,
        kind: Literal["completion", "chat"],
        request_id: str,
        request_id_from_client: bool,
        prompt_token_ids: list[int],
        max_tokens: int,
        logprobs: int | None,
    ) -> PreparedGeneration:
        stop_token_ids = list(body.stop_token_ids or [])
        self.prompts.check_token_ids(stop_token_ids, "stop_token_ids")

        # A random seed still makes the request reproducible, because it is logged and can be sent back.
        seed = body.seed if body.seed is not None else secrets.randbelow(RANDOM_SEED_LIMIT)
        if seed + body.n - 1 > MAX_SEED:
            raise InvalidRequest(
                f"seed {seed} is too large for n={body.n}: choice i uses seed + i, which must stay <= {MAX_SEED}",
                param="seed",
            )

        # Client ids may repeat, so a random suffix keeps the Redis keys of engine requests unique.
        base_id = f"{request_id}-{secrets.token_hex(4)}" if request_id_from_client else request_id
        engine_ids = [base_id] if body.n == 1 else [f"{base_id}-{index}" for index in range(body.n)]
        arrival_time = time.time()
        engine_requests = [
            GenerateRequest(
                request_id=engine_id,
                prompt_token_ids=prompt_token_ids,
                sampling=SamplingParams(
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k,
                    seed=seed + index,
                    max_tokens=max_tokens,
                    stop=list(body.stop or []),
                    stop_token_ids=stop_token_ids,
                    ignore_eos=body.ignore_eos,
                    logprobs=logprobs,
                ),
                arrival_time=arrival_time,
            )
            for index, engine_id in enumerate(engine_ids)
        ]
        return PreparedGeneration(
            request_id=request_id,
            kind=kind,
            model=self.settings.model_id,
            created=int(arrival_time),
            prompt_token_ids=prompt_token_ids,
            engine_requests=engine_requests,
            stream=body.stream,
            include_usage=body.include_usage,
            logprobs=logprobs,
        )

    # Execution.

    async def admit(self, prepared: PreparedGeneration) -> None:
        """Raise ``NotReady`` or ``Overloaded`` unless all choices of the request can be queued now."""
        await self.engine.check_admission(len(prepared.engine_requests))

    async def run(self, prepared: PreparedGeneration) -> AsyncIterator[tuple[ChoiceResult, EngineEvent]]:
        """Submit every choice and yield ``(choice, event)`` after adding each event to its choice.

        Raises ``EngineFailed`` on an ``ErrorEvent`` and ``RequestTimeout`` after
        ``request_timeout_s``. Closing the generator early cancels the unfinished
        choices.
        """
        sampling = prepared.engine_requests[0].sampling
        logger.info(
            "admitted request %s (%s): prompt_tokens=%d max_tokens=%d n=%d seed=%d temperature=%g top_p=%g "
            "top_k=%d stream=%s engine_ids=%s",
            prepared.request_id,
            prepared.kind,
            len(prepared.prompt_token_ids),
            sampling.max_tokens,
            len(prepared.engine_requests),
            sampling.seed,
            sampling.temperature,
            sampling.top_p,
            sampling.top_k,
            prepared.stream,
            ",".join(request.request_id for request in prepared.engine_requests),
        )
        submitted_at = time.monotonic()
        deadline = submitted_at + self.settings.request_timeout_s
        choices = [
            ChoiceResult(index=index, request_id=request.request_id)
            for index, request in enumerate(prepared.engine_requests)
        ]
        for choice in choices:
            choice.timing.submitted_at = submitted_at

        running = len(choices)
        self.metrics.running_requests.labels(self.metrics.model_name).inc(running)
        outcome = "incomplete"
        try:
            async with aclosing(self.engine.stream_many(prepared.engine_requests, deadline)) as events:
                async for index, event in events:
                    choice = choices[index]
                    self._record(choice, event)
                    if isinstance(event, ErrorEvent):
                        outcome = f"engine error {event.code}"
                        raise EngineFailed(f"the engine failed on request {prepared.request_id}: {event.message}")
                    if isinstance(event, FinishEvent):
                        running -= 1
                        self.metrics.running_requests.labels(self.metrics.model_name).dec()
                        self.metrics.observe_choice(choice)
                    yield choice, event
            outcome = ",".join(str(choice.finish_reason) for choice in choices)
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        except Exception as exc:
            if outcome == "incomplete":
                outcome = type(exc).__name__
            raise
        finally:
            self.metrics.running_requests.labels(self.metrics.model_name).dec(running)
            self._log_finish(prepared, choices, outcome, submitted_at)

    async def collect(self, prepared: PreparedGeneration) -> list[ChoiceResult]:
        """Run the request to the end and return the finished choices, in index order."""
        choices: dict[int, ChoiceResult] = {}
        async with aclosing(self.run(prepared)) as events:
            async for choice, _event in events:
                choices[choice.index] = choice
        return [choices[index] for index in sorted(choices)]

    @staticmethod
    def _record(choice: ChoiceResult, event: EngineEvent) -> None:
        now = time.monotonic()
        choice.add(event)
        if isinstance(event, TokenEvent) and event.token_ids:
            if choice.timing.first_token_at is None:
                choice.timing.first_token_at = now
            choice.timing.last_token_at = now
        elif isinstance(event, (FinishEvent, ErrorEvent)):
            choice.timing.finished_at = now

    @staticmethod
    def _log_finish(prepared: PreparedGeneration, choices: list[ChoiceResult], outcome: str, submitted_at: float) -> None:
        first_tokens = [c.timing.first_token_at for c in choices if c.timing.first_token_at is not None]
        ttft = f"{min(first_tokens) - submitted_at:.3f}s" if first_tokens else "none"
        logger.info(
            "finished request %s: outcome=%s prompt_tokens=%d completion_tokens=%d ttft=%s e2e=%.3fs",
            prepared.request_id,
            outcome,
            len(prepared.prompt_token_ids),
            # A cancelled or failed choice has no usage yet; count the tokens it streamed.
            sum(max(choice.completion_tokens, len(choice.token_ids)) for choice in choices),
            ttft,
            time.monotonic() - submitted_at,
        )
