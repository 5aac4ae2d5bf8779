"""Entry point of the draft service (``saguaro-draft``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from shared.config import add_settings_flags, settings_from_args
from shared.modeling import load_causal_lm, load_tokenizer, place_process, quantize_int8, tokenizer_fingerprint
from shared.protocol import ReplicaInfo
from shared.service import Heartbeat, connect_redis, default_replica_id, now, setup_logging, start_health_server

logger = logging.getLogger("saguaro.draft")


def check_tokenizer_against_target(settings, draft_tokenizer) -> None:
    """Refuse to start when the target's tokenizer is readable here and differs from the draft's."""
    from shared.model_store import check_tokenizers_match

    if not (Path(settings.target_model) / "config.json").is_file():
        logger.info("target model %s is not on this host; verify replicas check the tokenizer hash instead", settings.target_model)
        return
    check_tokenizers_match(settings.target_model, settings.draft_model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saguaro-draft", description="Saguaro draft service: runs the draft model and builds the speculation cache.")
    add_settings_flags(parser)
    settings = settings_from_args(parser.parse_args(argv))
    setup_logging(settings.log_level, settings.log_json)

    from services.draft.engine import DraftEngine
    from services.draft.server import DraftServer
    from services.draft.vocab import VocabSubset, special_token_ids

    try:
        device = place_process(settings.draft_device, settings.draft_threads, settings.draft_cpus)
        tokenizer = load_tokenizer(settings.draft_model)
        check_tokenizer_against_target(settings, tokenizer)
        int8 = settings.draft_quantization == "int8" and device.type == "cpu"
        model = load_causal_lm(settings.draft_model, "float32" if int8 else settings.dtype, device)
        vocab = None
        if 0 < settings.draft_vocab_size < model.config.vocab_size:
            vocab = VocabSubset(model, settings.draft_vocab_size, special_token_ids(tokenizer, model), quantize=int8)
            logger.info("draft output layer scores %d of %d tokens; it grows with the tokens requests use", len(vocab.known), vocab.vocab_size)
        if int8:
            model = quantize_int8(model)
        client = connect_redis(settings.redis_url)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        logger.error("draft service cannot start: %s", exc)
        return 1

    engine = DraftEngine(model, device, vocab)
    server = DraftServer(engine, client, settings.namespace, settings.draft_bind, prefill_chunk=settings.prefill_chunk_size)
    replica_id = settings.replica_id or default_replica_id("draft")
    address = settings.draft_advertise or server.address
    started_at = now()
    fingerprint = tokenizer_fingerprint(tokenizer)

    def info() -> ReplicaInfo:
        return ReplicaInfo(
            role="draft",
            replica_id=replica_id,
            address=address,
            model=settings.draft_model,
            running=len(engine.sequences),
            tokenizer_hash=fingerprint,
            started_at=started_at,
        )

    heartbeat = Heartbeat(client, settings.namespace, info)
    heartbeat.beat()
    heartbeat.start()

    def readiness() -> tuple[bool, dict]:
        return heartbeat.healthy, {"redis": heartbeat.healthy, "model": settings.draft_model, "sequences": len(engine.sequences)}

    start_health_server(settings.metrics_host, settings.draft_metrics_port, readiness)

    def stop(signum, frame) -> None:
        logger.info("draft service stopping (signal %d)", signum)
        server.stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("draft service %s ready: model %s on %s, advertised at %s", replica_id, settings.draft_model, device, address)
    try:
        server.serve_forever()
    finally:
        heartbeat.stop()
    logger.info("draft service stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
