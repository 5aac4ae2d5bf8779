"""Entry point of the verify service (``saguaro-verify``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from shared.config import add_settings_flags, settings_from_args
from shared.modeling import eos_token_ids, load_causal_lm, load_tokenizer, place_process, tokenizer_fingerprint
from shared.protocol import ReplicaInfo
from shared.service import Heartbeat, connect_redis, default_replica_id, now, setup_logging, start_health_server

logger = logging.getLogger("saguaro.verify")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saguaro-verify", description="Saguaro verify service: runs the target model and the verify loop.")
    add_settings_flags(parser)
    settings = settings_from_args(parser.parse_args(argv))
    setup_logging(settings.log_level, settings.log_json)

    from services.verify.draft_client import DraftClient
    from services.verify.engine import TargetEngine
    from services.verify.worker import VerifyWorker
    from shared.model_store import TokenizerMismatchError, check_tokenizers_match

    try:
        device = place_process(settings.verify_device, settings.verify_threads, settings.verify_cpus)
        tokenizer = load_tokenizer(settings.target_model)
        if settings.mode != "ar" and (Path(settings.draft_model) / "config.json").is_file():
            check_tokenizers_match(settings.target_model, settings.draft_model)
        model = load_causal_lm(settings.target_model, settings.dtype, device)
        client = connect_redis(settings.redis_url)
    except (FileNotFoundError, ValueError, ConnectionError, TokenizerMismatchError) as exc:
        logger.error("verify service cannot start: %s", exc)
        return 1

    replica_id = settings.replica_id or default_replica_id("verify")
    fingerprint = tokenizer_fingerprint(tokenizer)
    drafts = DraftClient(client, settings.namespace, fingerprint) if settings.mode != "ar" else None
    if settings.batch_invariant and device.type != "cpu":
        # NOTE: row attention fixes the attention side on any device, but the matmul row probe
        # runs only on CPUs; on a GPU, linear layers get at least two rows, unchecked.
        logger.warning("batch_invariant was only checked on CPU; on %s greedy output may still depend on the batch", device)
    engine = TargetEngine(model, device, prefill_chunk=settings.prefill_chunk_size, batch_invariant=settings.batch_invariant)
    worker = VerifyWorker(settings, engine, tokenizer, eos_token_ids(model, tokenizer), client, drafts, replica_id)
    started_at = now()

    def info() -> ReplicaInfo:
        return ReplicaInfo(
            role="verify",
            replica_id=replica_id,
            model=settings.model_id,
            mode=settings.mode,
            running=len(worker.active),
            tokenizer_hash=fingerprint,
            started_at=started_at,
        )

    heartbeat = Heartbeat(client, settings.namespace, info)
    heartbeat.beat()
    heartbeat.start()

    def readiness() -> tuple[bool, dict]:
        draft_ok = drafts is None or bool(drafts.refresh())
        return heartbeat.healthy and draft_ok, {"redis": heartbeat.healthy, "draft": draft_ok, "running": len(worker.active)}

    start_health_server(settings.metrics_host, settings.verify_metrics_port, readiness)

    def stop(signum, frame) -> None:
        logger.info("verify service stopping (signal %d)", signum)
        worker.stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if drafts is not None:
        drafts.refresh(force=True)
    logger.info("verify service %s ready: model %s on %s, mode %s", replica_id, settings.target_model, device, settings.mode)
    try:
        worker.run()
    finally:
        heartbeat.stop()
        if drafts is not None:
            drafts.close()
    logger.info("verify service stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
