"""The SSRF-safe transport: a requests adapter whose sockets connect only to the address a guard approved, so DNS
rebinding cannot swap a checked address for another; plus URL origin helpers the fetcher's host rules use."""
from __future__ import annotations

import socket
from typing import Callable
from urllib.parse import urlsplit

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as _u3_connection

Resolver = Callable[[str, int], list[str]]

class _ForbiddenAddress(Exception):
    """Raised inside the socket layer; deliberately not an OSError so urllib3/requests don't wrap or retry it."""



def default_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6), as strings."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))



def _origin(url: str) -> tuple[str, str, int] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts.scheme, parts.hostname.lower().rstrip("."), port


def _split_host_pattern(pattern: str) -> tuple[str, str]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address → (host, port or "")."""
    if pattern.startswith("["):
        host, _, rest = pattern[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if pattern.count(":") == 1:
        host, _, port = pattern.partition(":")
        return host, port
    return pattern, ""


# -- sockets that connect only to checked addresses ------------------------------------------------------------



class _GuardMixin:
    guard: Callable[[str, int], list[str]]

    def _new_conn(self) -> socket.socket:
        # Resolve and check here, at connect time, then connect to exactly those addresses: a second DNS
        # answer (rebinding) can't point the socket somewhere the check did not see. `self.host` is left alone,
        # so the Host header, SNI and the certificate check still use the URL's host name.
        addresses = type(self).guard(self.host, self.port)
        last: Exception = _ForbiddenAddress(f"{self.host} has no address")
        for address in addresses:
            try:
                return _u3_connection.create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except socket.timeout:
                last = ConnectTimeoutError(self, f"Connection to {self.host} timed out (connect timeout={self.timeout})")
            except OSError as exc:  # try the next checked address
                last = NewConnectionError(self, f"Failed to establish a new connection: {exc}")
        raise last


class _GuardedHTTPConnection(_GuardMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardMixin, HTTPSConnection):
    pass


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: Callable[[str, int], list[str]]):
        self._guard = guard
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        guard = staticmethod(self._guard)
        http_conn = type("GuardedHTTPConnection", (_GuardedHTTPConnection,), {"guard": guard})
        https_conn = type("GuardedHTTPSConnection", (_GuardedHTTPSConnection,), {"guard": guard})
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
        }


