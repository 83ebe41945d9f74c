"""A fault-injecting HTTP proxy for S3 endpoints, on loopback (standard library only).

It sits between an S3 client (botocore, s3fs, anything that takes an endpoint URL) and a real
endpoint (moto's server, MinIO), forwards every request, and with a seeded probability answers
one with a fault instead:

``slowdown``      503 with S3's ``SlowDown`` XML error body; the request is not forwarded.
``internal``      500 with S3's ``InternalError`` XML error body; not forwarded.
``reset_before``  forwarded (the store applied it), then the connection is reset (RST) before
                  any byte of the answer: the client cannot tell whether its request took effect.
``reset_after``   forwarded, status line and headers sent, then reset (harmless to an answer
                  with an empty body, which is complete once its headers are).
``cut``           forwarded, headers sent with the full ``Content-Length``, then half of the
                  body and the connection closed: a body cut short (a request whose answer has
                  no body gets ``reset_after`` instead, logged as such).
``delay``         held for ``delay_s`` seconds, then forwarded and answered normally.

Each fault is logged (logger ``curation.faultproxy``, INFO) and recorded in
:attr:`FaultProxy.injected` as ``(kind, method, path)``; :attr:`FaultProxy.requests` counts the
requests seen and :attr:`FaultProxy.history` lists them as ``(method, path, Range header)``. ``rate=1.0`` is a store that fails persistently; ``rate`` and ``only`` may be
changed while the proxy runs (``p.rate = 0`` heals the store). The draws come from one
``random.Random(seed)``: with one client thread the same run injects the same faults; with
concurrent clients the rate holds but which request gets which fault depends on their order.

    with FaultProxy("http://127.0.0.1:5000", rate=0.1, seed=0) as p:
        os.environ["AWS_ENDPOINT_URL"] = p.url   # or storage_options client_kwargs.endpoint_url
        ...
        print(p.requests, len(p.injected))

Why not toxiproxy (or mitmproxy): toxiproxy needs its Go server binary and works at the TCP
level (latency, bandwidth, reset, slicing), so it cannot answer an S3 ``SlowDown`` or an
``InternalError`` with their XML bodies; mitmproxy is a large dependency for a few hundred
lines of ``http.server``.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable
from urllib.parse import urlsplit

log = logging.getLogger("curation.faultproxy")

KINDS = ("slowdown", "internal", "reset_before", "reset_after", "cut", "delay")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Fault:
    kind: str
    method: str
    path: str


def error_body(code: str, message: str, resource: str) -> bytes:
    """An S3 error document (the XML S3 sends with a 4xx/5xx answer)."""
    rid = uuid.uuid4().hex[:16].upper()
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{_xml(resource)}</Resource>"
            f"<RequestId>{rid}</RequestId></Error>").encode()


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class FaultProxy:
    """Forward HTTP requests to ``upstream`` and inject faults into a fraction ``rate`` of them.

    ``kinds``: the faults to draw from (uniformly; see the module doc). ``only``: a predicate
    ``(method, path) -> bool`` choosing which requests may get a fault (all by default).
    ``delay_s``: how long a ``delay`` fault holds its request.
    """

    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0, kinds: Iterable[str] = KINDS,
                 delay_s: float = 0.2, only: Callable[[str, str], bool] | None = None) -> None:
        kinds = tuple(kinds)
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be an http://host:port URL, got {upstream!r}")
        self.upstream = (u.hostname, u.port or 80)
        self.rate, self.kinds, self.delay_s, self.only = rate, kinds, delay_s, only
        self.requests = 0
        self.injected: list[Fault] = []
        self.history: list[tuple[str, str, str | None]] = []  # (method, path, Range header) of every request
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ bookkeeping

    def draw(self, method: str, path: str, range_: str | None = None) -> str | None:
        """Count one request and decide its fault (None: forward it untouched)."""
        with self._lock:
            self.requests += 1
            self.history.append((method, path, range_))
            if self.only is not None and not self.only(method, path):
                return None
            if self.rate <= 0 or self._rng.random() >= self.rate:
                return None
            return self._rng.choice(self.kinds)

    def record(self, kind: str, method: str, path: str) -> None:
        with self._lock:
            self.injected.append(Fault(kind, method, path))
        log.info("injected %s into %s %s", kind, method, path)

    def counts(self) -> dict[str, int]:
        """Injected faults by kind."""
        out: dict[str, int] = {}
        with self._lock:
            for f in self.injected:
                out[f.kind] = out.get(f.kind, 0) + 1
        return out


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # faults are logged by FaultProxy.record; plain requests are not

    def _any(self) -> None:
        body = self._read_body()
        method, path = self.command, self.path
        kind = self.owner.draw(method, path, self.headers.get("Range"))
        if kind in _ERRORS:
            self.owner.record(kind, method, path)
            return self._error(kind, path)
        if kind == "delay":
            self.owner.record(kind, method, path)
            time.sleep(self.owner.delay_s)
        status, reason, headers, payload = self._forward(body)
        if kind == "reset_before":
            self.owner.record(kind, method, path)
            return self._reset()
        if kind in ("reset_after", "cut"):
            if kind == "cut" and (method == "HEAD" or len(payload) < 2):
                kind = "reset_after"
            self.owner.record(kind, method, path)
            self._answer(status, reason, headers, payload, len(payload) // 2 if kind == "cut" else 0)
            return self._reset() if kind == "reset_after" else self._close()
        self._answer(status, reason, headers, payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive upstream connection the server closed: reconnect once
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self._upstream.getresponse()
                payload = resp.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        if self.command != "HEAD":
            out = [(k, v) for k, v in out if k.lower() != "content-length"] + [("Content-Length", str(len(payload)))]
        return resp.status, resp.reason, out, payload

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
                cut_at: int = 0) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload[:cut_at] if cut_at else payload)
        self.wfile.flush()

    def _error(self, kind: str, path: str) -> None:
        status, reason, code, message = _ERRORS[kind]
        body = b"" if self.command == "HEAD" else error_body(code, message, path.split("?", 1)[0])
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        if kind == "slowdown":
            headers.append(("Retry-After", "0"))
        self._answer(status, reason, headers, body)

    def _reset(self) -> None:
        """Abort the connection: RST instead of FIN (SO_LINGER with a zero timeout)."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _close(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the socket was reset on purpose
        if self._upstream is not None:
            self._upstream.close()
