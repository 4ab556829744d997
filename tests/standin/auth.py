"""JWTs as a Supabase project issues and checks them (HS256 with the project's secret)."""

from __future__ import annotations

import time
from typing import Any

import jwt

# The secret and expiry of `supabase start`: with them the keys below are the well-known local ones.
DEFAULT_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
DEMO_EXPIRY = 1983812996


class TokenError(Exception):
    """A JWT that a Supabase service would refuse; `kind` says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def api_key(secret: str, role: str) -> str:
    """An API key (anon, service_role) shaped like the ones a project hands out."""
    return jwt.encode({"iss": "supabase-demo", "role": role, "exp": DEMO_EXPIRY}, secret, algorithm="HS256")


def sign(secret: str, claims: dict[str, Any], expires_in: int) -> str:
    """A token with `iat` and `exp` added, as storage signs its URLs."""
    now = int(time.time())
    return jwt.encode({**claims, "iat": now, "exp": now + expires_in}, secret, algorithm="HS256")


def verify(token: str | None, secret: str, *, require_role: bool = True) -> dict[str, Any]:
    """The claims of a valid token; raises TokenError like the services' checks do."""
    if not token:
        raise TokenError("missing", "API key is missing")
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=["HS256"], options={"verify_aud": False, "require": []}
        )
    except jwt.ExpiredSignatureError as exc:
        raise TokenError("expired", "Token has expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenError("signature", "Failed to validate JWT signature") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError("malformed", "The token provided is not a valid JWT") from exc
    if require_role and (not isinstance(claims.get("role"), str) or not isinstance(claims.get("exp"), int)):
        raise TokenError("claims", "Fields `role` and `exp` are required in JWT")
    return claims
