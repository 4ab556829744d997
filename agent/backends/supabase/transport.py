"""The HTTP client shared by PostgREST and Storage, and the translation of their failures.

Every failure leaves this backend as a domain error: transport errors, timeouts, 5xx, 408 and 429
as BackendUnavailable (the core retries those), anything else as BackendError.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
from postgrest import APIError
from storage3.exceptions import StorageApiError
from storage3.utils import StorageException

from agent.domain.errors import AgentError, BackendError, BackendUnavailable, NotFound

TRANSIENT_STATUS = frozenset({408, 425, 429})


class ServerUnavailable(Exception):
    """A 5xx, 408 or 429 answer, raised by the response hook before any client parses the body."""

    def __init__(
        self, status: int, method: str, url: str, body: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} from {method} {url}: {body[:200]}")
        self.status = status
        self.retry_after = retry_after


async def _raise_unavailable(response: httpx.Response) -> None:
    # postgrest-py turns a 5xx into an APIError that no longer carries the status, and storage3
    # keeps whatever status the body claims; raising here classifies both by the real status.
    if response.status_code >= 500 or response.status_code in TRANSIENT_STATUS:
        await response.aread()
        request = response.request
        raise ServerUnavailable(
            response.status_code,
            request.method,
            _redact(request.url),
            response.text,
            _retry_after(response.headers.get("retry-after")),
        )


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from Supabase and ignored)."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def _redact(url: httpx.URL) -> str:
    """The URL without its query string, which may carry a signed token."""
    return str(url.copy_with(query=None))


def http_client(
    *,
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
    max_connections: int = 64,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The client handed to the supabase client (options.httpx_client): its pool, deadlines and hook."""
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=True,
        http2=True,
        event_hooks={"response": [_raise_unavailable]},
    )


def storage_status(exc: StorageApiError) -> int | None:
    """Storage puts the real status in the body (`statusCode`: "404" under an HTTP 400)."""
    try:
        return int(str(exc.status))
    except ValueError:
        return None


def translate(exc: BaseException, what: str) -> AgentError:
    """The domain error for a failure of a PostgREST or Storage call."""
    if isinstance(exc, ServerUnavailable):
        return BackendUnavailable(f"{what}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return BackendUnavailable(f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, (httpx.TransportError, httpx.DecodingError)):
        return BackendUnavailable(f"{what}: {type(exc).__name__}: {exc or 'connection failed'}")
    if isinstance(exc, APIError):
        return BackendError(f"{what}: PostgREST error {exc.code}: {exc.message}")
    if isinstance(exc, StorageApiError):
        status = storage_status(exc)
        message = f"{what}: storage error {exc.status} {exc.code}: {exc.message}"
        if status == 404:
            return NotFound(message)
        if status is not None and (status >= 500 or status in TRANSIENT_STATUS):
            return BackendUnavailable(message)
        return BackendError(message)
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")


TRANSLATED = (ServerUnavailable, httpx.RequestError, APIError, StorageException, ValueError)


@contextmanager
def boundary(what: str) -> Iterator[None]:
    """Re-raise the failures of the calls inside as domain errors."""
    try:
        yield
    except TRANSLATED as exc:
        raise translate(exc, what) from exc


def utc_now() -> str:
    """This host's UTC clock as PostgREST takes it; see store.py on clock skew."""
    return datetime.now(UTC).isoformat()
