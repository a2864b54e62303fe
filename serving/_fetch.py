"""Fetch an ``http(s)`` request video without letting the request reach the inside of the network (SSRF).

:class:`VideoFetcher` is the only code of the endpoint that opens a connection for a request; aiohttp does the
HTTP. The policy, checked on the first URL and on every redirect hop:

- the scheme is ``http`` or ``https``; a URL with user info (``http://user@host``) is refused;
- the host's addresses (the literal, or every address DNS gives) are public: loopback, private (RFC 1918,
  unique-local), link-local (169.254.0.0/16 with the cloud metadata service, fe80::/10), multicast, reserved
  and unspecified addresses are refused, IPv4-mapped IPv6 addresses as their IPv4;
- the connection goes to the addresses that were checked (aiohttp gets a resolver pinned to them), so a DNS
  answer that changes between the check and the connection (rebinding) changes nothing;
- ``allow_hosts`` opens hosts by name (``videos.internal``) or by network (``10.1.0.0/16``, ``127.0.0.1``);
- at most ``max_redirects`` redirects, each hop checked again; the body is read up to ``max_bytes``.

Errors name the policy or the outcome (refused, timed out, HTTP status, over the size limit), never what an
internal host answered: a refused address is never contacted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

__all__ = ["FetchError", "VideoFetcher", "refused_address"]

REDIRECTS = (301, 302, 303, 307, 308)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """A fetch the endpoint refuses or that failed: an HTTP status for the client and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def refused_address(address: IPAddress) -> str | None:
    """Why the fetch policy refuses ``address`` (``"loopback"``, ``"private"``...), or ``None`` if it is public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "private", "reserved", "unspecified"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if not address.is_global:
        return "non-global"
    return None


class _PinnedResolver(AbstractResolver):
    """An aiohttp resolver that answers one host with the addresses the policy checked (no second DNS lookup)."""

    def __init__(self, host: str, addresses: list[IPAddress]):
        self.host = host
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        if host != self.host:  # aiohttp asks for the URL's host only
            raise OSError(f"resolver pinned to {self.host}, asked for {host}")
        return [
            {
                "hostname": host,
                "host": str(a),
                "port": port,
                "family": socket.AF_INET6 if a.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


class VideoFetcher:
    """Fetches request videos under the SSRF policy of the module docstring.

    Args:
        max_bytes: largest body read (bytes); a larger one is a 413.
        timeout_s: time limit of the whole fetch, every hop and the body (seconds).
        allow_hosts: host names or IP networks (``"10.0.0.0/8"``, ``"127.0.0.1"``) the policy lets through.
        max_redirects: redirects followed.

    Raises:
        ValueError: an ``allow_hosts`` entry that is neither a host name nor a network.
    """

    def __init__(self, max_bytes: int, timeout_s: float, allow_hosts: list[str] = (), max_redirects: int = 3):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.allowed_names: set[str] = set()
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allow_hosts:
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not entry or any(c in entry for c in "/:@ "):
                    raise ValueError(f"media.allow_hosts: {entry!r} is neither a host name nor a network") from None
                self.allowed_names.add(entry.lower().rstrip("."))

    def _allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allowed_networks)

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses to connect to for ``host``; raises :class:`FetchError` (403) on a refused one."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError:
                raise FetchError(400, f"could not resolve the video's host {host!r}") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if host.lower().rstrip(".") in self.allowed_names:
            return addresses
        for address in addresses:
            reason = refused_address(address)
            if reason and not self._allowed(address):
                raise FetchError(
                    403,
                    f"refused by the endpoint's fetch policy: {host} is a {reason} address "
                    "(only public addresses are fetched; media.allow_hosts opens others)",
                )
        return addresses

    async def fetch(self, url: str) -> bytes:
        """The bytes of the video at ``url``.

        Raises:
            FetchError: 400 (not http(s), unresolvable, connection failed, HTTP error, too many redirects,
                timed out), 403 (the policy refused an address or a redirect target), 413 (over ``max_bytes``).
        """
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except asyncio.TimeoutError:
            raise FetchError(400, f"fetching the video took longer than {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        for _hop in range(self.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError(403, f"refused by the endpoint's fetch policy: {url[:80]!r} is not an http(s) URL")
            if parts.username is not None or parts.password is not None:
                raise FetchError(400, "a video URL may not carry user info (user@host)")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise FetchError(400, f"bad port in the video URL {url[:80]!r}") from None
            addresses = await self._addresses(parts.hostname, port)
            connector = aiohttp.TCPConnector(resolver=_PinnedResolver(parts.hostname, addresses), use_dns_cache=False)
            async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
                try:
                    async with session.get(url, allow_redirects=False) as response:
                        if response.status in REDIRECTS and "Location" in response.headers:
                            url = urljoin(url, response.headers["Location"])
                            continue
                        if response.status != 200:
                            raise FetchError(400, f"fetching the video failed: HTTP {response.status}")
                        if (response.content_length or 0) > self.max_bytes:
                            raise FetchError(413, f"the video is larger than the limit of {self.max_bytes} bytes")
                        data = bytearray()
                        async for chunk in response.content.iter_chunked(1 << 16):
                            data += chunk
                            if len(data) > self.max_bytes:
                                raise FetchError(413, f"the video is larger than the limit of {self.max_bytes} bytes")
                        return bytes(data)
                except aiohttp.ClientError:
                    raise FetchError(400, f"fetching the video failed: could not connect to {parts.hostname}") from None
        raise FetchError(400, f"fetching the video failed: more than {self.max_redirects} redirects")
