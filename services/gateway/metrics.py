"""Prometheus metrics of the gateway, named ``saguaro:*`` like vLLM's ``vllm:*``.

Each app gets its own ``CollectorRegistry``, so several apps (tests, or REST and
gRPC sharing one process) never register a metric twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.gateway.engine_client import ChoiceResult

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.requests = Counter(
            "saguaro:requests",
            "Finished requests by API endpoint and status (HTTP status code or gRPC status name).",
            ["model_name", "endpoint", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "saguaro:time_to_first_token_seconds",
            "Time from admission to the first generated token, per engine request, seconds.",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "saguaro:time_per_output_token_seconds",
            "Time between the first and the last token divided by the tokens after the first, seconds.",
            labels,
            buckets=TPOT_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            "saguaro:e2e_request_latency_seconds",
            "Time from admission to the finish event, per engine request, seconds.",
            labels,
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "saguaro:queue_depth",
            "Engine requests admitted and not finished, across all gateways (size of the Redis inflight set).",
            labels,
            registry=self.registry,
        )
        self.running_requests = Gauge(
            "saguaro:num_requests_running",
            "Engine requests this gateway is waiting on or streaming.",
            labels,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "saguaro:prompt_tokens",
            "Prompt tokens of finished engine requests.",
            labels,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "saguaro:generation_tokens",
            "Generated tokens of finished engine requests.",
            labels,
            registry=self.registry,
        )

    def count_request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(self.model_name, endpoint, str(status)).inc()

    def observe_choice(self, choice: ChoiceResult) -> None:
        """Record the latencies and token counts of one finished engine request."""
        timing = choice.timing
        if timing.first_token_at is not None:
            self.time_to_first_token.labels(self.model_name).observe(timing.first_token_at - timing.submitted_at)
        if timing.first_token_at is not None and timing.last_token_at is not None and choice.completion_tokens > 1:
            decode_s = timing.last_token_at - timing.first_token_at
            self.time_per_output_token.labels(self.model_name).observe(decode_s / (choice.completion_tokens - 1))
        if timing.finished_at is not None:
            self.e2e_request_latency.labels(self.model_name).observe(timing.finished_at - timing.submitted_at)
        self.prompt_tokens.labels(self.model_name).inc(choice.prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(choice.completion_tokens)

    def render(self, queue_depth: int | None) -> bytes:
        if queue_depth is not None:
            self.queue_depth.labels(self.model_name).set(queue_depth)
        return generate_latest(self.registry)
