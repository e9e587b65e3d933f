"""The address guard of event endpoints: a webhook must not become a way into the operator's
network (SSRF).

A URL is checked when it is registered and again at every delivery, because a name's addresses
can change between the two (DNS rebinding): the name is resolved, *every* address it resolves to
must be public, and the delivery connects to the address that was checked, never resolving
again. Refused: loopback, private (RFC 1918, unique local), link-local (which holds the cloud
metadata service, 169.254.169.254), multicast, shared, reserved and unspecified addresses, and
IPv4 addresses mapped into IPv6 that are any of these; i.e. everything that is not globally
routable. ``MODELGATE_WEBHOOK_ALLOW_PRIVATE_TARGETS=true`` lifts the rule (tests, closed
networks); https is required in production either way."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from auth.errors import InvalidRequest

MAX_URL_LENGTH = 2048
# A name that takes longer than this to resolve is refused (a request must not wait on DNS).
RESOLVE_TIMEOUT_SECONDS = 2.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetRefused(InvalidRequest):
    """A URL the guard refuses (422 at registration; a ``refused`` attempt at delivery)."""


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: the URL as registered, and the checked address to connect to."""

    url: str
    host: str
    port: int
    address: str
    scheme: str

    @property
    def connect_url(self) -> str:
        """The URL with the checked address in place of the name (IPv6 in brackets)."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return parts._replace(netloc=f"{literal}:{self.port}").geturl()

    @property
    def host_header(self) -> str:
        """The ``Host`` header the URL's owner expects."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def check_url(url: str, *, production: bool) -> SplitResult:
    """The URL's syntax: http(s) (https only in production), a host, no credentials in it."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"the URL is longer than {MAX_URL_LENGTH} characters", loc=("url",))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TargetRefused("the URL is not valid", loc=("url",)) from None
    allowed = ("https",) if production else ("http", "https")
    if parts.scheme not in allowed:
        raise TargetRefused(f"the URL's scheme must be {' or '.join(allowed)}", loc=("url",))
    if not parts.hostname:
        raise TargetRefused("the URL has no host", loc=("url",))
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("the URL may not carry credentials", loc=("url",))
    if port == 0:
        raise TargetRefused("the URL's port is not valid", loc=("url",))
    return parts


def is_public(address: IPAddress) -> bool:
    """Whether a delivery may connect to ``address``: globally routable and not multicast."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    if mapped is not None:
        return is_public(mapped)
    return address.is_global and not address.is_multicast


async def resolve_target(url: str, *, allow_private: bool, production: bool) -> Target:
    """Check the URL, resolve its host and check every address; the target to connect to.
    Raises ``TargetRefused``."""
    parts = check_url(url, production=production)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
        except (OSError, UnicodeError, TimeoutError):
            raise TargetRefused("the URL's host does not resolve", loc=("url",)) from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise TargetRefused("the URL's host does not resolve", loc=("url",))
    if not allow_private:
        for address in addresses:
            if not is_public(address):
                raise TargetRefused(
                    "the URL resolves to a loopback, private, link-local, multicast or "
                    "otherwise non-public address",
                    loc=("url",),
                )
    return Target(url=url, host=host, port=port, address=str(addresses[0]), scheme=parts.scheme)
