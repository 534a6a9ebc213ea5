"""Who may use `btsearch serve`'s API: a bearer token, when the server is given one.

Every /api operation then needs `Authorization: Bearer <token>`; a missing or wrong one gets
401 with `WWW-Authenticate: Bearer`. The token is compared in constant time (hmac.compare_digest)
so the time of a refusal says nothing about how much of a guess was right. The page at / and the
OpenAPI schema stay open: they hold nothing of the collection, and the page must load to ask for
the token.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from fastapi import Depends, HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "No `Authorization: Bearer <token>` header, or a wrong token.",
        "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
}


def is_loopback(host: str) -> bool:
    """Whether `host` (an interface to listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def token_dependencies(token: str | None) -> list[Any]:
    """The dependencies every API operation runs: none without a token, else the bearer check
    (declared as OpenAPI's `http` `bearer` security scheme)."""
    if token is None:
        return []
    if not token:
        raise ValueError("the token is empty")
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="The token `btsearch serve` was given (--token or BTSEARCH_TOKEN).")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        # The header's own bytes (ASGI servers decode headers as latin-1), against the token's UTF-8.
        given = credentials.credentials.encode("latin-1") if credentials is not None and credentials.scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, expected):
            detail = "this server needs a token: send Authorization: Bearer <token>" if not given else "wrong token"
            raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})

    return [Depends(require_token)]
