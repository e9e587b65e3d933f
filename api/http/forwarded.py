"""Which address a request comes from: the socket's peer, or, when that peer is one of the
operator's trusted reverse proxies (``MODELGATE_TRUSTED_PROXIES``), the address those proxies
saw, read from ``X-Forwarded-For`` by the rightmost-untrusted rule.

``X-Forwarded-For: a, b, c`` arriving from peer ``p`` means: ``p`` was told by its client ``c``
that ``c``'s client was ``b``, who said its client was ``a``. Only what a trusted hop wrote can be
believed, and each hop appends on the right; so the walk starts at the right and goes left while
the address it stands on is a trusted proxy, and the first address that is not a trusted proxy is
the client. Everything to its left was written by that client (or by hops it chose) and is
ignored: a spoofed leftmost entry changes nothing.

Bounds and the safe readings: at most ``MAX_HOPS`` entries are examined, from the right (a
longer header is only split that far); an entry longer than ``MAX_ENTRY_LENGTH`` or that is not
a bare IP address (a port, a name, ``unknown``, garbage) stops the walk, and the request is
attributed to the last trusted hop reached: the proxy that handed on the unreadable entry. The
same holds when every examined entry is a trusted proxy. In both cases the address is one the
operator trusts to have been a real peer, never one a client wrote. ``Forwarded`` (RFC 7239) and
``X-Real-IP`` are not read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from auth.settings import IPNetwork, parse_networks

# Hops examined from the right: more proxies than this in front of one service is a
# misconfiguration, and a client cannot make the walk cost more than this.
MAX_HOPS = 16
# The longest textual IPv6 address with an IPv4 tail is 45 characters.
MAX_ENTRY_LENGTH = 45

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> IPAddress | None:
    text = text.strip()
    if not text or len(text) > MAX_ENTRY_LENGTH:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:192.0.2.1 is 192.0.2.1 (a dual-stack socket reports IPv4 peers that way).
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The operator's trusted proxies, and the client address of a request given its peer and
    its ``X-Forwarded-For`` headers."""

    def __init__(self, networks: Sequence[IPNetwork]) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, value: str) -> TrustedProxies:
        """From ``MODELGATE_TRUSTED_PROXIES`` (comma-separated addresses and networks)."""
        return cls(parse_networks(value))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def is_trusted(self, address: IPAddress) -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        return any(address in network for network in self.networks)

    def client_address(self, peer: str | None, forwarded_for: Sequence[str]) -> str | None:
        """The peer itself unless it is a trusted proxy; otherwise the rightmost address in
        ``forwarded_for`` (the header's values in order) that is not a trusted proxy, or the
        last trusted hop when the walk stops first (see the module's docstring)."""
        if not self.networks or peer is None:
            return peer
        current = _parse(peer)
        if current is None or not self.is_trusted(current):
            return peer
        # Several X-Forwarded-For fields are one list, in order (RFC 9110 section 5.3).
        joined = ",".join(forwarded_for)
        if not joined:
            return str(current)
        # rsplit with a bound: a long header is split only as far as the walk can go.
        entries = joined.rsplit(",", MAX_HOPS)[-MAX_HOPS:]
        for entry in reversed(entries):
            hop = _parse(entry)
            if hop is None:
                break  # unreadable: the proxy that handed it on is the last we can vouch for
            if not self.is_trusted(hop):
                return str(hop)
            current = hop
        return str(current)
