"""Settings shared by the gateway, verify and draft services.

Every field can be set by an environment variable with the prefix ``SAGUARO_``
(``SAGUARO_MODE=sd``) and, for the service entry points, by a command-line flag
(``--mode sd``). Flags override environment variables, which override defaults.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DecodeMode = Literal["ar", "sd", "ssd"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


def default_model_dir() -> Path:
    return Path(os.environ.get("SAGUARO_MODEL_DIR", Path.home() / ".cache" / "saguaro" / "models"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGUARO_", extra="ignore")

    # Shared infrastructure.
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL; use rediss:// for TLS and redis://:PASSWORD@host for a password")
    namespace: str = Field("saguaro", description="prefix of every Redis key, so several deployments can share one Redis")
    log_level: str = Field("INFO", description="logging level of the service")
    log_json: bool = Field(False, description="write logs as one JSON object per line")

    # Models.
    target_model: str = Field(str(default_model_dir() / "qwen2.5-coder-1.5b-instruct"), description="Hugging Face causal-LM directory of the target model")
    draft_model: str = Field(str(default_model_dir() / "qwen2.5-coder-0.5b-instruct"), description="Hugging Face causal-LM directory of the draft model")
    served_model_name: str = Field("", description="model id shown by /v1/models; empty means the target directory's name")
    dtype: DType = Field(
        "auto",
        description="weight and activation dtype of both models; auto means bfloat16 on GPUs and on CPUs with native bf16 matmuls "
        "(AVX512-BF16 or AMX), float32 on other CPUs",
    )
    draft_quantization: Literal["none", "int8"] = Field(
        "int8",
        description="int8: dynamic int8 quantization of the draft's linear layers on CPU (about 3x faster on this kind of machine); "
        "the draft only proposes tokens, so this changes speed, never the output",
    )
    draft_vocab_size: int = Field(
        32768,
        ge=0,
        description="score only the first N token ids plus special tokens and every token requests use in the draft's output layer "
        "(faster draft forwards; output stays exact); 0 scores the whole vocabulary",
    )
    batch_invariant: bool = Field(
        True,
        description="run the target's decode forwards with row-by-row attention and at least two query rows, so a position's logits, "
        "and greedy output, are the same bits in AR, SD and SSD steps and at any batch size, in bf16 too (checked on CPU); "
        "false uses SDPA for every forward",
    )
    max_model_len: int = Field(4096, ge=16, description="maximum prompt plus completion length in tokens")
    prefill_chunk_size: int = Field(
        256,
        ge=1,
        description="prompt tokens per prefill forward; the verify service runs one chunk between two decode steps and the draft "
        "service one between two messages, so a long prompt delays running requests by one chunk at a time (smaller: shorter delays, slower prefill)",
    )

    # Decoding.
    mode: DecodeMode = Field("ssd", description="ar: target only; sd: speculative decoding; ssd: speculative speculative decoding")
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="K, draft tokens per verification step")
    fanout: Annotated[list[int], NoDecode] = Field(default_factory=list, description="fixed fan-out per acceptance length j=0..K (K+1 entries); empty means geometric allocation of fanout_budget")
    fanout_policy: Literal["adaptive", "geometric"] = Field(
        "adaptive",
        description="adaptive: allocate fanout_budget from measured acceptance lengths and candidate ranks; geometric: from the capped geometric model, with its acceptance rate and miss exponents fitted to the same measurements",
    )
    fanout_budget: int = Field(8, ge=1, le=256, description="MQ_LEN, total branches the draft decodes per step")
    fanout_acceptance_rate: float = Field(0.7, gt=0.0, lt=1.0, description="prior per-token acceptance rate a of the fan-out allocation, used until measured acceptance takes over")
    fanout_miss_exponent: float = Field(1.0, gt=0.0, description="prior r in P(miss at fan-out F) = (F + 1)^-r, weighted as 20 lookups, until measured ranks take over")
    backup: Literal["auto", "jit", "ngram", "none"] = Field(
        "auto",
        description="speculation after an SSD cache miss: jit (draft K tokens now), ngram (prompt lookup), none (verify the root alone); auto picks per step from measured times and yields",
    )
    acceptance: Literal["coupled", "rejection"] = Field(
        "coupled",
        description="T > 0 acceptance test. coupled: the draft proposes its argmax and a token is accepted iff it equals the target's seeded sample, "
        "so a seed gives the same output in every mode; rejection: the draft samples from its distribution q and the verifier runs the "
        "speculative-sampling test with that q (needed for saguaro_c)",
    )
    saguaro_c: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Saguaro sampling factor C (SSD, rejection acceptance, T > 0): the draft multiplies the probability of the tokens it caches "
        "by C, which raises the cache hit rate and lowers acceptance; 1 is plain sampling",
    )
    proposal_support: int = Field(32, ge=1, le=4096, description="tokens of the draft's distribution q sent with each sampled draft token (rejection acceptance)")
    cache_ttl_s: float = Field(30.0, gt=0, description="lifetime of speculation-cache entries in Redis, seconds")
    cache_wait_s: float = Field(10.0, gt=0, description="how long the verifier waits for the draft's cache before treating the step as a miss, seconds")
    draft_timeout_s: float = Field(30.0, gt=0, description="how long the verifier waits for a draft reply before decoding without speculation, seconds")
    speculation_backoff: bool = Field(
        True,
        description="fit forward, cache-build and draft times against the batch size, and lower the drafts per request and pick each step's kind of speculation from them",
    )
    step_kind: Literal["auto", "cache", "jit", "plain"] = Field(
        "auto",
        description="how verify steps get their speculation: cache (SSD caches, SSD mode only), jit (a batched draft after each step, as SD), plain (none); auto picks per step from fitted costs at the current batch size",
    )
    max_num_seqs: int = Field(4, ge=1, description="requests one verify replica decodes at the same time")

    # Placement.
    verify_device: str = Field("cpu", description="device of the target model: cpu or cuda:N")
    draft_device: str = Field("cpu", description="device of the draft model: cpu or cuda:N")
    verify_threads: int = Field(1, ge=1, description="torch CPU threads of the verify service")
    draft_threads: int = Field(1, ge=1, description="torch CPU threads of the draft service")
    verify_cpus: str = Field("", description="CPU cores the verify process is pinned to, e.g. '0' or '0-3'; empty leaves it unpinned")
    draft_cpus: str = Field("", description="CPU cores the draft process is pinned to, e.g. '1'; empty leaves it unpinned")

    # Endpoints.
    draft_bind: str = Field("tcp://127.0.0.1:5601", description="ZeroMQ address the draft service binds")
    draft_advertise: str = Field("", description="ZeroMQ address verify replicas use to reach this draft; empty means draft_bind")
    gateway_host: str = Field("127.0.0.1", description="interface the gateway's HTTP server binds")
    gateway_port: int = Field(8000, ge=1, le=65535, description="port of the gateway's HTTP API")
    grpc_port: int = Field(0, ge=0, le=65535, description="port of the gateway's gRPC API; 0 disables it")
    verify_metrics_port: int = Field(8101, ge=0, le=65535, description="port of the verify service's /metrics and health endpoints; 0 disables them")
    draft_metrics_port: int = Field(8102, ge=0, le=65535, description="port of the draft service's /metrics and health endpoints; 0 disables them")
    metrics_host: str = Field("127.0.0.1", description="interface the verify and draft health/metrics servers bind")
    replica_id: str = Field("", description="name of this replica in Redis; empty means host-pid")

    # Gateway limits.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="accepted Bearer API keys; empty disables authentication")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="largest request body the gateway accepts, bytes")
    max_queue_depth: int = Field(256, ge=1, description="admitted but unfinished requests above which the gateway responds with 429")
    request_timeout_s: float = Field(600.0, gt=0, description="time after which the gateway gives up on a request, seconds")

    @field_validator("fanout", "api_keys", mode="before")
    @classmethod
    def _split_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _check_fanout(self) -> "Settings":
        if self.fanout and len(self.fanout) != self.num_speculative_tokens + 1:
            raise ValueError(
                f"fanout has {len(self.fanout)} entries but needs num_speculative_tokens + 1 = "
                f"{self.num_speculative_tokens + 1} (one per acceptance length 0..K)"
            )
        if any(f < 0 for f in self.fanout):
            raise ValueError("fanout entries must be >= 0")
        if self.step_kind == "cache" and self.mode != "ssd":
            raise ValueError(f"step_kind=cache needs mode=ssd, got mode={self.mode}; use jit, plain or auto")
        if self.saguaro_c < 1.0 and self.acceptance != "rejection":
            raise ValueError(
                f"saguaro_c={self.saguaro_c} needs acceptance=rejection: the coupled test drafts the argmax, so there is no q for C to reshape"
            )
        return self

    @property
    def model_id(self) -> str:
        return self.served_model_name or Path(self.target_model).name

    @property
    def draft_address(self) -> str:
        return self.draft_advertise or self.draft_bind


def _flag_type(annotation: Any):
    origin = get_origin(annotation)
    if origin is list:
        return str  # comma-separated; the validator splits it
    if origin is Literal:
        return str
    if annotation is bool:
        return lambda text: text.lower() in ("1", "true", "yes", "on")
    if annotation in (int, float, str):
        return annotation
    return str


def add_settings_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add one ``--flag`` per settings field (or per name in ``names``) to ``parser``."""
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        choices = list(get_args(field.annotation)) if get_origin(field.annotation) is Literal else None
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_flag_type(field.annotation),
            choices=choices,
            default=None,
            help=field.description,
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Build settings from the environment, with the flags that were given overriding it."""
    overrides = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    return Settings(**overrides)
