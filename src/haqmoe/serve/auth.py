"""Who may drive the server: API keys, the loopback rule, and no cross-site "simple" requests.

The server runs one engine with one worker, so anyone who can reach the port can occupy it. On
loopback (the default bind) that is the local user; on any other address an API key is required
unless the user accepts the risk (``haqmoe serve --allow-unauthenticated``). Keys are checked by
one ASGI middleware in front of every route, before a body is read, so an unauthenticated client
can neither generate, nor read ``/metrics``, nor make the server parse a large body.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from pathlib import Path

from ..errors import HaqmoeError

ENV_KEY = "HAQMOE_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # liveness probes never carry credentials
PAGE_PATHS = frozenset({"/"})  # the web page: static files, no data; it asks for the key for the API calls
PAGE_PREFIX = "/ui/"
_KEY = re.compile(r"[!-~]+")  # printable ASCII without spaces: what an HTTP header carries unchanged
_ORIGIN = re.compile(r"https?://[^/\s?#]+")  # scheme://host[:port], as a browser sends it in Origin


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``; anything else, names included, is not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_keys(keys, where: str = "--api-key") -> tuple[str, ...]:
    """Keys as a tuple; an empty or unsendable key is an error that does not echo the key."""
    keys = tuple(keys)
    for i, key in enumerate(keys, 1):
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise HaqmoeError(f"{where}: API key #{i} is empty or not printable ASCII without spaces "
                              "(an HTTP header could not carry it)")
    return keys


def check_origins(origins) -> tuple[str, ...]:
    """``--cors-origin`` values must be exact browser origins (a trailing slash or path never matches)."""
    origins = tuple(origins)
    for o in origins:
        if o != "*" and not _ORIGIN.fullmatch(o):
            raise HaqmoeError(f"--cors-origin {o!r} is not an origin like https://app.example.com or "
                              "http://localhost:3000 (scheme://host[:port], no path or trailing slash)")
    return origins


def read_key_file(path: str | Path) -> tuple[str, ...]:
    """One key per line; blank lines and lines starting with # are ignored; no key at all is an error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise HaqmoeError(f"cannot read API key file {path}: {why}") from None
    keys = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if not keys:
        raise HaqmoeError(f"API key file {path} holds no keys (one key per line; # starts a comment)")
    return check_keys(keys, f"API key file {path}")


def error_body(message: str, code: str | None = None) -> bytes:
    """The server's OpenAI-style error JSON (the same shape ``ApiError`` answers with)."""
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def send_error(send, status: int, message: str, code: str | None = None, headers=()) -> None:
    body = error_body(message, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _is_json(content_type: bytes | None) -> bool:
    kind = (content_type or b"").split(b";")[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


class Guard:
    """ASGI middleware: the API key on every path but ``/health`` (and ``/metrics`` when ``metrics_open``;
    the web page's static files ``/`` and ``/ui/*`` when ``page``: they hold no data, and a browser
    cannot send a Bearer header when it navigates; the page sends the key it is given on every API
    call), then JSON-only POST bodies.

    The key check hashes the presented token and compares it with every key's hash by
    ``hmac.compare_digest``, without stopping at a match: the time taken says nothing about which
    key, or how much of one, was right. Keys are never logged or echoed.

    The JSON-only rule (415 otherwise) holds with or without keys: a web page on another origin may
    send a "simple" cross-site POST (text/plain, a form, or a body with no Content-Type) without a
    CORS preflight; its answer is unreadable to the page, but the generation it asked for would
    still occupy the engine. A JSON POST always needs a preflight, which no origin passes unless
    ``--cors-origin`` allows it.
    """

    def __init__(self, app, cfg, metrics):
        """``cfg``: the ``ServeConfig`` (its repr leaves the keys out, so the app's middleware list, which
        shows these arguments, does too)."""
        self.app, self.metrics = app, metrics
        self.digests = [hashlib.sha256(k.encode()).digest() for k in check_keys(cfg.api_keys)]
        self.open = OPEN_PATHS | ({"/metrics"} if cfg.metrics_open else set()) | \
            (PAGE_PATHS if getattr(cfg, "page", False) else set())
        self.page = getattr(cfg, "page", False)

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool | None:
        """True for a known key, False for a wrong one, None when no ``Authorization: Bearer`` is sent."""
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if len(values) != 1:  # none, or several (ambiguous: never guess which one counts)
            return None if not values else False
        scheme, _, token = values[0].strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return None
        presented = hashlib.sha256(token).digest()
        ok = False
        for digest in self.digests:  # every key, no early exit
            ok |= hmac.compare_digest(presented, digest)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], scope.get("headers") or []
        if self.digests and path not in self.open and not (self.page and path.startswith(PAGE_PREFIX)):
            ok = self.authorized(headers)
            if not ok:
                self.metrics.unauthorized_request(path)
                message = ("invalid API key" if ok is False else
                           "missing API key: send the header 'Authorization: Bearer <key>'")
                return await send_error(send, 401, message, "invalid_api_key",
                                        [(b"www-authenticate", b'Bearer realm="haqmoe"')])
        if scope["method"] == "POST" and not _is_json(dict(headers).get(b"content-type")):
            self.metrics.count_request(path, 415)
            return await send_error(send, 415, "Content-Type must be application/json", "unsupported_media_type")
        await self.app(scope, receive, send)
