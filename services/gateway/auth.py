"""API key check shared by the REST middleware and the gRPC server."""

from __future__ import annotations

import hmac

from services.gateway.errors import AuthenticationFailed


def check_api_key(authorization: str | None, api_keys: list[str]) -> None:
    """Raise ``AuthenticationFailed`` unless ``authorization`` is ``Bearer <key>`` with a configured key.

    Does nothing when ``api_keys`` is empty. Error messages never repeat the key.
    """
    if not api_keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(
            "missing API key: send it in the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    presented = token.encode()
    # Compare against every key so the time taken does not reveal which key matched.
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise AuthenticationFailed(
            "invalid API key; check the key sent in the Authorization header",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
