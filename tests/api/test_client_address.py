"""The client address behind trusted proxies (api.http.forwarded): the rightmost-untrusted rule, its
bounds and its safe readings, and the setting's validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.http.forwarded import MAX_HOPS, TrustedProxies
from auth.identity.failure_throttle import address_identifier
from auth.settings import Settings

PROXIES = TrustedProxies.parse("10.0.0.0/8, 192.0.2.1, fd00::/8")


def test_an_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    assert PROXIES.client_address("198.51.100.7", ["203.0.113.1"]) == "198.51.100.7"
    assert TrustedProxies.parse("").client_address("10.0.0.1", ["203.0.113.1"]) == "10.0.0.1"


def test_a_trusted_peer_forwards_the_rightmost_untrusted_address() -> None:
    assert PROXIES.client_address("10.1.2.3", ["203.0.113.1"]) == "203.0.113.1"
    # Behind two proxies, and with entries the client wrote itself on the left.
    assert PROXIES.client_address("192.0.2.1", ["6.6.6.6, 203.0.113.1, 10.9.9.9"]) == "203.0.113.1"
    # Several header fields are one list, in order.
    assert PROXIES.client_address("10.1.2.3", ["6.6.6.6", "203.0.113.1", "10.2.2.2"]) == (
        "203.0.113.1"
    )
    assert PROXIES.client_address("fd00::1", ["2001:db8::5"]) == "2001:db8::5"
    # A dual-stack socket's view of an IPv4 proxy.
    assert PROXIES.client_address("::ffff:10.1.2.3", [" 203.0.113.1 "]) == "203.0.113.1"


def test_without_a_readable_client_the_last_trusted_hop_is_the_client() -> None:
    """The safe readings: never an address a client could have chosen."""
    # No header at all.
    assert PROXIES.client_address("10.1.2.3", []) == "10.1.2.3"
    # An entry that is not a bare address stops the walk at the hop that handed it on.
    for unreadable in ("unknown", "203.0.113.1:4711", "_hidden", "", "a" * 100, "[2001:db8::1]"):
        assert PROXIES.client_address("10.1.2.3", [f"6.6.6.6, {unreadable}"]) == "10.1.2.3"
    assert PROXIES.client_address("10.1.2.3", ["203.0.113.1, junk, 10.4.4.4"]) == "10.4.4.4"
    # Nothing but trusted proxies: the leftmost of them.
    assert PROXIES.client_address("10.1.2.3", ["10.7.7.7, 10.8.8.8"]) == "10.7.7.7"


def test_the_walk_is_bounded_however_long_the_header() -> None:
    trusted_hops = ", ".join(f"10.0.0.{i}" for i in range(1, MAX_HOPS + 1))
    # The client is one hop beyond the bound: the walk stops at the last trusted hop it saw.
    assert PROXIES.client_address("10.1.2.3", [f"203.0.113.1, {trusted_hops}"]) == "10.0.0.1"
    long_header = "6.6.6.6, " * 10_000 + "203.0.113.1"
    assert PROXIES.client_address("10.1.2.3", [long_header]) == "203.0.113.1"


def test_a_bad_trusted_proxies_entry_stops_the_configuration() -> None:
    for bad in ("10.0.0.300", "proxy.example", "10.0.0.1/8", "10.0.0.0/33", "10.0.0.1,,nope"):
        with pytest.raises(ValidationError, match="MODELGATE_TRUSTED_PROXIES"):
            Settings(_env_file=None, trusted_proxies=bad)  # type: ignore[call-arg]
    settings = Settings(_env_file=None, trusted_proxies=" 10.0.0.0/8 ,192.0.2.1,")  # type: ignore[call-arg]
    assert [str(n) for n in settings.trusted_proxy_networks] == ["10.0.0.0/8", "192.0.2.1/32"]


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    assert address_identifier("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_identifier("2001:db8:1:2::ffff") == "2001:db8:1:2::/64"
    assert address_identifier("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_identifier("192.0.2.1") == "192.0.2.1"
    assert address_identifier(None) == "unknown"
    assert address_identifier("testclient") == "testclient"
