"""The client's address behind trusted proxies: the rightmost hop that is not one of them."""

import pytest

from fleet.lib.addresses import client_address, parse_networks

PROXIES = parse_networks(["10.0.0.0/8", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    "peer, forwarded_for, expected",
    [
        ("192.0.2.1", None, "192.0.2.1"),
        ("192.0.2.1", "198.51.100.1", "192.0.2.1"),  # not a proxy of ours: its header is ignored
        ("10.0.0.5", None, "10.0.0.5"),
        ("10.0.0.5", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.5", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the left end is the client's to fill
        ("10.0.0.5", "198.51.100.1, 10.0.0.9", "198.51.100.1"),  # two proxies of ours
        ("10.0.0.5", "10.0.0.8, 10.0.0.9", "10.0.0.8"),
        ("10.0.0.5", "198.51.100.1, not-an-address", "10.0.0.5"),
        ("2001:db8:ffff::1", "2001:db8::7", "2001:db8::7"),
        (None, "198.51.100.1", None),
    ],
)
def test_it_takes_the_rightmost_hop_that_is_not_a_trusted_proxy(peer, forwarded_for, expected):
    assert client_address(peer, forwarded_for, PROXIES) == expected


def test_it_names_a_range_that_is_not_one():
    with pytest.raises(ValueError, match="'10.0.0.0/33' is not an IP address or CIDR range"):
        parse_networks(["10.0.0.0/33"])
