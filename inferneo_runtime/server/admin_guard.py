"""Who may use the management endpoints (register / load / unload models, routing rules, A/B tests).

A web page on the same machine can send requests to a loopback server: directly (a cross-origin "simple"
POST with a text/plain body needs no CORS preflight) or by DNS rebinding (its own host name made to resolve
to 127.0.0.1, so the browser sends `Host: evil.example`). Each admin request therefore passes, in order:

- Host: a loopback name, an IP literal (rebinding always uses a name), the address the server binds, or one of
  `allowed_hosts`. Else 421 (misdirected request).
- Origin (sent by browsers): when present, its host must pass the same test. Else 403.
- Content type: a state-changing request (POST) must say `application/json`, which a browser cannot send
  cross-origin without a preflight this server never approves. Else 415.
- Who: with an admin token set, `Authorization: Bearer <token>`. Without one, the socket peer must be a
  loopback address (never a header: uvicorn's proxy headers are off, X-Forwarded-For is not read), and the
  server must bind a loopback address: bound elsewhere, the management API needs a token.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Optional
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from ..errors import InferneoError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class AdminForbidden(InferneoError):
    """A management endpoint was called without the admin token, from a non-loopback client, or from a page."""


class MisdirectedHost(InferneoError):
    """The Host header names a host this server does not answer management requests for (DNS rebinding)."""


class NotJSON(InferneoError):
    """A state-changing management request without `Content-Type: application/json`."""


def _ip(text: str) -> Optional[ipaddress._BaseAddress]:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def is_loopback_address(address: Optional[str]) -> bool:
    ip = _ip(address or "")
    return ip is not None and (ip.is_loopback or (getattr(ip, "ipv4_mapped", None) or ip).is_loopback)


def binds_loopback(host: str) -> bool:
    """Whether the server's bind address reaches only this machine."""
    return host.lower() in LOOPBACK_NAMES or is_loopback_address(host)


def host_name(value: str) -> str:
    """The host part of a Host header value (`name:port`, `[::1]:8000`), lower-case, without a trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class AdminGuard:
    """The checks above, over the server's settings (ServerConfig)."""

    def __init__(self, config):
        self.config = config
        self.allowed = {host_name(h) for h in config.allowed_hosts} | LOOPBACK_NAMES
        bind = host_name(config.host)
        if bind not in ("0.0.0.0", "::", ""):
            self.allowed.add(bind)

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return bool(name) and (name in self.allowed or _ip(name) is not None)

    def is_admin(self, request: Request) -> bool:
        """Whether the caller may see what only admins see (sources, load errors); raises nothing."""
        try:
            self._who(request)
            return self.host_allowed(request.headers.get("host", ""))
        except InferneoError:
            return False

    def check(self, request: Request) -> None:
        if not self.config.admin_api:
            raise StarletteHTTPException(404, "the management API is off (admin_api: false)")
        host = request.headers.get("host", "")
        if not self.host_allowed(host):
            raise MisdirectedHost(f"the management API does not answer for Host {host[:100]!r}; it answers for "
                                  f"loopback names, IP addresses and allowed_hosts (INFERNEO_ALLOWED_HOSTS)")
        origin = request.headers.get("origin")
        if origin is not None and not self.host_allowed(urlsplit(origin).netloc if "://" in origin else ""):
            raise AdminForbidden(f"the management API does not answer requests from pages of origin "
                                 f"{origin[:100]!r}")
        if request.method in STATE_CHANGING:
            media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if request.method != "DELETE" and media != "application/json":
                raise NotJSON(f"management requests must send `Content-Type: application/json` (got "
                              f"{media[:60] or 'none'!r}); send a JSON body, `{{}}` when there is nothing to say")
        self._who(request)

    def _who(self, request: Request) -> None:
        token = self.config.admin_token
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise AdminForbidden("the management API needs `Authorization: Bearer <admin token>`")
            return
        if not binds_loopback(self.config.host):
            raise AdminForbidden(f"this server binds {self.config.host}, so the management API needs an admin token "
                                 f"(INFERNEO_ADMIN_TOKEN); without one it is off")
        peer = request.scope.get("client")
        if not is_loopback_address(peer[0] if peer else None):
            raise AdminForbidden("the management API answers loopback clients only; set an admin token "
                                 "(INFERNEO_ADMIN_TOKEN) to use it from elsewhere")
