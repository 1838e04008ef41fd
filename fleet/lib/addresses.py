"""The client's address behind reverse proxies the operator trusts. No Django here.

A proxy appends the address it was reached from to X-Forwarded-For, so the header
reads "client, proxy1, proxy2" and only its right end is written by proxies; any
client can put anything at its left. The rightmost address that is not a trusted
proxy is therefore the client, and a peer that is not a trusted proxy is the client
itself, whatever header it sends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> list[Network]:
    """CIDR ranges (or single addresses); ValueError names the one that is not."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR range") from None
    return networks


def is_trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: Sequence[Network]) -> str | None:
    """The client's address: the peer, or the rightmost untrusted hop of X-Forwarded-For."""
    if not peer or not forwarded_for or not is_trusted(peer, proxies):
        return peer or None
    address = peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            # Not an address: no proxy of ours wrote it, so the last hop we trust is the answer.
            return address
        address = hop
        if not is_trusted(hop, proxies):
            return hop
    # Every hop is a trusted proxy: the leftmost is as close to the client as we can tell.
    return address
