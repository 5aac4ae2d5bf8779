"""How the local launcher finds or starts Redis."""

import pytest
import redis

from services import launcher
from services.launcher import Stack


def test_private_redis_when_none_answers(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("SAGUARO_REDIS_URL", raising=False)
    real_check = launcher.redis_reachable
    # Pretend the Redis on the default port is not there.
    monkeypatch.setattr(launcher, "redis_reachable", lambda url: ":6379/" not in url and real_check(url))
    stack = Stack(services=())
    url = stack._resolve_redis()
    try:
        assert ":6379/" not in url
        assert redis.Redis.from_url(url).ping()
    finally:
        stack.stop()
    assert not real_check(url)


def test_unreachable_explicit_url_is_an_error(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:secret@127.0.0.1:1/0")
    stack = Stack(services=())
    with pytest.raises(ConnectionError, match="not reachable") as error:
        stack._resolve_redis()
    assert "secret" not in str(error.value)


def test_reachable_default_is_used(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("SAGUARO_REDIS_URL", raising=False)
    assert Stack(services=())._resolve_redis() == "redis://127.0.0.1:6379/0"
