"""Network endpoints as users write them: ``host:port``, ``[v6]:port``, lists and comma separated strings.

One parser for the reader (teacher endpoints), discovery (ZooKeeper hosts, registered teachers) and Pantheon.
Every error is a ValueError that names the bad item and says what was expected.

Example::

    >>> parse_endpoints("10.0.0.5:9292, [::1]:9393")
    [Endpoint(host='10.0.0.5', port=9292), Endpoint(host='::1', port=9393)]
    >>> str(parse_endpoint("[::1]:9393"))
    '[::1]:9393'
    >>> format_endpoints(["a:1", "b:2"])
    'a:1,b:2'
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

__all__ = ["Endpoint", "parse_endpoint", "parse_endpoints", "format_endpoints", "WILDCARD_HOSTS"]

# Host names per RFC 1123 (letters, digits, '-', dots; '_' tolerated as many private DNS setups use it); used with
# fullmatch (a '$' would match before a trailing newline).
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")   # ASCII digits only (str.isdigit also takes other scripts' digits)
_SCOPE_ID = re.compile(r"[0-9A-Za-z_.-]{1,64}")   # an IPv6 zone: an interface name or number
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class Endpoint:
    """A host (name, IPv4 or IPv6 address without brackets) and a TCP port (1-65535)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        """True for 0.0.0.0 and ``::``: an address to bind, never one to dial."""
        return self.host in WILDCARD_HOSTS


def parse_endpoint(text: str, what: str = "endpoint", default_port: Optional[int] = None,
                   allow_wildcard: bool = True) -> Endpoint:
    """Parse ``host:port`` or ``[v6]:port`` (surrounding blanks ignored).

    Args:
        text: the endpoint as written by the user.
        what: what the endpoint is, for the error message (``"teacher endpoint"``, ``"ZooKeeper host"``).
        default_port: the port when ``text`` has none (then ``host`` and a bare IPv6 address are accepted).
        allow_wildcard: False refuses 0.0.0.0 and ``[::]`` (addresses others must dial).

    Raises:
        ValueError: naming ``what`` and ``text``: not a string, no port, port out of 1-65535, bad host.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} {text!r} is not a string 'host:port'")
    item = text.strip()
    host, port_text = _split(item, default_port)
    if host is None:
        raise ValueError(f"{what} {text!r} is not 'host:port' or '[ipv6]:port'")
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{what} {text!r}: port {port_text!r} is not a number in 1-65535")
    if item.startswith("[") and not _is_ipv6(host):
        raise ValueError(f"{what} {text!r}: only an IPv6 address goes in brackets, not {host!r}")
    if not _valid_host(host):
        raise ValueError(f"{what} {text!r}: {host!r} is not a host name, IPv4 or IPv6 address")
    endpoint = Endpoint(host, int(port_text))
    if endpoint.is_wildcard and not allow_wildcard:
        raise ValueError(f"{what} {text!r}: a wildcard address cannot be dialed; give the host name or IP")
    return endpoint


def parse_endpoints(value: Union[str, Sequence[str]], what: str = "endpoint", default_port: Optional[int] = None,
                    allow_wildcard: bool = True, allow_empty: bool = False) -> list[Endpoint]:
    """Parse a comma separated string or a sequence of strings (each may itself hold commas), blanks ignored.

    Raises:
        ValueError: an item that ``parse_endpoint`` refuses (the message names it), a value that is neither a
            string nor a sequence of strings, or no endpoint at all unless ``allow_empty``.
    """
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        items = [part for item in value for part in item.split(",")]
    else:
        raise ValueError(f"{what}s {value!r}: expected 'host:port[,host:port...]' or a list of 'host:port'")
    endpoints = [parse_endpoint(item, what, default_port, allow_wildcard) for item in items if item.strip()]
    if not endpoints and not allow_empty:
        raise ValueError(f"no {what} given ({value!r}); expected 'host:port[,host:port...]'")
    return endpoints


def format_endpoints(value: Union[str, Sequence[Union[str, Endpoint]]], what: str = "endpoint") -> str:
    """The canonical comma separated form (``host:port,[v6]:port``) of what ``parse_endpoints`` accepts."""
    items = value if isinstance(value, str) else [str(item) for item in value]
    return ",".join(str(endpoint) for endpoint in parse_endpoints(items, what))


def _split(item: str, default_port: Optional[int]) -> tuple[Optional[str], str]:
    if item.startswith("["):
        close = item.find("]")
        if close < 0:
            return None, ""
        rest = item[close + 1:]
        if rest.startswith(":"):
            return item[1:close], rest[1:]
        return (item[1:close], str(default_port)) if not rest and default_port is not None else (None, "")
    if item.count(":") == 1:
        host, _, port = item.partition(":")
        return host, port
    if default_port is not None and (":" not in item or _is_ipv6(item)):
        return item, str(default_port)
    return None, ""


def _valid_host(host: str) -> bool:
    return host in WILDCARD_HOSTS - {""} or _is_ipv6(host) or bool(_HOSTNAME.fullmatch(host))


def _is_ipv6(host: str) -> bool:
    address, percent, scope = host.partition("%")
    if percent and not _SCOPE_ID.fullmatch(scope):   # ipaddress accepts any zone text, blanks and ':' too
        return False
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address)
    except ValueError:
        return False
