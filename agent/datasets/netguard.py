"""Outbound HTTP for datasets only to addresses a row may make the agent reach.

A URL in a row could aim the agent at a cloud metadata endpoint or an internal service. Every
request (each redirect hop included) goes through `GuardedTransport`: the host is resolved once per
source, every address it resolves to must be public (unless ALLOW_PRIVATE_DATASET_URLS), and the
connection is made to that vetted address, so a name that resolves differently the second time
(DNS rebinding) cannot slip through. Metadata endpoints are refused even when private addresses
are allowed: no dataset lives there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from agent.datasets.remote import RemoteError, RemoteTransient

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)


_METADATA = "a cloud metadata address"


class AddressRefused(RemoteError):
    """The URL's host is, or resolves to, an address datasets may not come from."""


def refusal(ip: IPAddress, allow_private: bool) -> str | None:
    """Why `ip` may not be contacted, or None when it may."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if mapped is not None:
        return refusal(mapped, allow_private)
    if ip in METADATA_ADDRESSES:
        return _METADATA
    if allow_private:
        return None
    for kind, hit in (
        ("an unspecified", ip.is_unspecified),
        ("a loopback", ip.is_loopback),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
        ("a non-public", not ip.is_global),
    ):
        if hit:
            return f"{kind} address"
    return None


@dataclass(frozen=True, slots=True)
class AddressGuard:
    allow_private: bool = False

    def check(self, host: str, ip: IPAddress) -> None:
        why = refusal(ip, self.allow_private)
        if why is None:
            return
        shown = host if host == str(ip) else f"{host} ({ip})"
        hint = "" if why == _METADATA else "; set ALLOW_PRIVATE_DATASET_URLS=true to allow it"
        raise AddressRefused(f"{shown[:200]} is {why}, not a place datasets may come from{hint}")


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to; AddressRefused when it does not resolve at all."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise RemoteTransient(f"cannot resolve {host[:200]} (temporary DNS failure)") from exc
        raise AddressRefused(f"cannot resolve host {host[:200]}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise AddressRefused(f"cannot resolve host {host[:200]}")
    return addresses


Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class GuardedTransport(httpx.AsyncBaseTransport):
    """Connects only to vetted addresses, each host pinned to the address it was vetted with."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, guard: AddressGuard, resolver: Resolver = resolve
    ) -> None:
        self._inner = inner
        self._guard = guard
        self._resolve = resolver
        self._pinned: dict[tuple[str, int], str] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise RemoteError(f"unsupported URL scheme {url.scheme[:20]!r}: datasets come over http(s)")
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        address = await self._address(host, port)
        extensions = dict(request.extensions)
        if url.scheme == "https":
            # TLS still checks the certificate against the name, not the pinned address.
            extensions.setdefault("sni_hostname", host)
        pinned = httpx.Request(
            request.method,
            url.copy_with(host=address),
            headers=request.headers,  # keeps the original Host header
            stream=request.stream,
            extensions=extensions,
        )
        return await self._inner.handle_async_request(pinned)

    async def _address(self, host: str, port: int) -> str:
        key = (host, port)
        if key in self._pinned:
            return self._pinned[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._pinned:
                return self._pinned[key]
            try:
                literal: IPAddress | None = ipaddress.ip_address(host)
            except ValueError:
                literal = None
            addresses = [literal] if literal is not None else await self._resolve(host, port)
            # Every answer is vetted: a name that resolves to a public and a private address is refused.
            for ip in addresses:
                self._guard.check(host, ip)
            # One address for the whole sync; IPv4 first, as a host without IPv6 routes can reach it.
            chosen = next((ip for ip in addresses if ip.version == 4), addresses[0])
            self._pinned[key] = str(chosen)
            return self._pinned[key]

    async def aclose(self) -> None:
        await self._inner.aclose()
