"""URL host policy for URL lists: http/https only; loopback, private, link-local and metadata hosts
refused unless the spec's ``allow_hosts`` lists them (literal addresses and well-known names only)."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal", "metadata.azure"}
)
LOCAL_PLACEHOLDER = "{LOCAL_SERVER}"


@dataclass(frozen=True)
class HostPolicy:
    """Which non-public hosts URL lists may reach: the spec's ``allow_hosts`` (names or CIDR networks)."""

    names: frozenset[str] = frozenset()
    """Host names allowed as written (lowercase)."""
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Address ranges allowed."""

    @classmethod
    def from_allow(cls, allow_hosts: Iterable[str]) -> HostPolicy:
        """Parse ``allow_hosts``: an address or CIDR network becomes a network, anything else a name."""
        names, networks = set(), []
        for entry in allow_hosts:
            text = entry.strip().strip("[]").lower()
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                names.add(text.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        """True when the host name or its literal address is listed."""
        if host in self.names:
            return True
        return address is not None and any(address in net for net in self.networks)


NAT64 = ipaddress.ip_network("64:ff9b::/96")
"""The well-known NAT64 prefix: its last 32 bits are the IPv4 address a NAT64 gateway connects to."""
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
"""Deprecated IPv4-compatible IPv6 addresses (``::a.b.c.d``)."""


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal-IP host means (including legacy forms like ``2130706433`` or ``0x7f.1``);
    IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, NAT64) mean that IPv4 address."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        if not re.fullmatch(r"[0-9a-fA-FxX.]+", text):
            return None
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return embedded_ipv4(address)


def embedded_ipv4(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address inside an IPv4-mapped, IPv4-compatible, 6to4 or NAT64 IPv6 address, else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _non_public(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str | None:
    """Why a host is not a public internet host (loopback, private, link-local, metadata), or None."""
    if address is not None:
        if address.is_loopback:
            return "a loopback address"
        if address.is_unspecified:
            return "the unspecified address (it reaches this machine)"
        if address.is_link_local:
            return "a link-local address (cloud metadata lives there)"
        if address.is_private:
            return "a private address"
        if not address.is_global:
            return "not a public address"
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "a loopback name"
    if host in METADATA_HOSTS:
        return "a cloud metadata name"
    return None


def address_problem(host: str, address: str, policy: HostPolicy) -> str | None:
    """Why a connection to ``address`` (what ``host`` resolved to) is refused, or None; used at connect
    time by the downloader's egress guard (``tasks/data/egress_guard``)."""
    try:
        parsed = embedded_ipv4(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return f"{address!r} is not an IP address"
    why = _non_public("", parsed)
    if why and not policy.allows(normalise_host(host), parsed):
        return f"{host} resolves to {parsed}, {why}"
    return None


def normalise_host(host: str) -> str:
    """Lowercase, no trailing dot, IDNA-encoded (``ｌｏｃａｌｈｏｓｔ`` is ``localhost`` to the resolver);
    ValueError for a name that cannot be encoded."""
    host = host.strip().rstrip(".").lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii").rstrip(".").lower()
        except UnicodeError as err:
            raise ValueError(f"host {host!r} is not a valid name ({err})") from None
    return host


def url_problem(url: str | None, policy: HostPolicy) -> str | None:
    """Why a URL may not be downloaded, or None. Only literal addresses and well-known names are
    checked (names are not resolved here; the downloader's egress guard checks resolved addresses)."""
    if not url or not url.strip():
        return "empty URL"
    url = url.strip()
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        return "URL contains whitespace or control characters"
    if LOCAL_PLACEHOLDER in url:
        return f"URL contains {LOCAL_PLACEHOLDER} but the subset has no local_server"
    try:
        parts = urlsplit(url)
        host = normalise_host(parts.hostname or "")
        _ = parts.port
    except ValueError as err:
        return f"malformed URL ({err})"
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"scheme {scheme or '(none)'!r} not allowed; only {', '.join(ALLOWED_SCHEMES)}"
    if not host:
        return "URL has no host"
    if "@" in parts.netloc:
        return "URL carries credentials"
    address = host_address(host)
    why = _non_public(host, address)
    if why and not policy.allows(host, address):
        return f"host {host} is {why}; list it in the spec's allow_hosts to permit it"
    return None
