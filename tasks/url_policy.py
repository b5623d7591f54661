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


def host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal-IP host means (including legacy forms like ``2130706433`` or ``0x7f.1``)."""
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
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _non_public(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str | None:
    """Why a host is not a public internet host (loopback, private, link-local, metadata), or None."""
    if address is not None:
        if address.is_loopback:
            return "a loopback address"
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


def url_problem(url: str | None, policy: HostPolicy) -> str | None:
    """Why a URL may not be downloaded, or None. Only literal addresses and well-known names are
    checked (names are not resolved here)."""
    if not url or not url.strip():
        return "empty URL"
    url = url.strip()
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        return "URL contains whitespace or control characters"
    if LOCAL_PLACEHOLDER in url:
        return f"URL contains {LOCAL_PLACEHOLDER} but the subset has no local_server"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".").lower()
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
