"""An S3 proxy that misbehaves as real object stores do, in front of the loopback moto server.

    proxy = FaultProxy(server.endpoint, seed=0)        # listens on 127.0.0.1, a free port
    proxy.rules = [Rule({"slowdown": 0.1, "reset": 0.05}, methods=("PUT",), prefix="bucket/out/_commits/")]
    ... point AWS_ENDPOINT_URL at proxy.endpoint, run capfilt ...
    proxy.counts  # {"requests": 812, "slowdown": 41, "reset": 19, ...}; proxy.injected: each fault
    proxy.stop()

Each request is forwarded to the upstream server unless a rule that matches its method and key
(`bucket/key`, path-style) draws a fault for it:

| kind | what the client sees | reaches the store |
|---|---|---|
| `slowdown` | `503 SlowDown` (S3's throttling answer) | no |
| `internal` | `500 InternalError` | no |
| `reset` | the status line, headers and half of the body, then a TCP reset | yes: a write lands, its answer is lost |
| `delay` | the right answer, `delay_s` late | yes |
| `forbidden` | `403 AccessDenied` (never worth a retry) | no |

Decisions are seeded and do not depend on thread timing: the n-th request of a method to a key
gets the same draw in every run with the same seed (so a retry of a request draws afresh, and a
rate below 1 always lets a request through after a few tries). A rule's `limit` caps how many
faults it injects; `rate` 1.0 with no limit fails every matching request until the rules change.
The proxy runs as threads of the process that starts it, so a test (or a benchmark) reads its
counts and changes its rules while capfilt's Ray workers talk to it over loopback.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

KINDS = ("slowdown", "internal", "reset", "delay", "forbidden")
_ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
           "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
           "forbidden": (403, "AccessDenied", "Access Denied")}
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Rule:
    """Faults by kind (share of matching requests each) for requests of `methods` under `prefix`."""

    rates: dict[str, float]  # kind -> share of matching requests; their sum is at most 1
    methods: tuple[str, ...] = ()  # HTTP methods it applies to; () is every method
    prefix: str = ""  # `bucket/key` prefix it applies to; "" is every key (and bucket-level calls)
    limit: int | None = None  # faults it injects at most; None: no cap
    delay_s: float = 0.5  # how late a `delay` answer comes
    injected: int = field(default=0, init=False)

    def __post_init__(self):
        unknown = set(self.rates) - set(KINDS)
        if unknown or sum(self.rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"rates {self.rates}: kinds are {KINDS} and the shares sum to at most 1")

    def matches(self, method: str, key: str) -> bool:
        return (not self.methods or method in self.methods) and key.startswith(self.prefix)


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, rules: list[Rule] | None = None):
        split = urlsplit(upstream)
        self.upstream = (split.hostname, split.port)
        self.seed = seed
        self.rules = list(rules or [])
        self.counts: Counter[str] = Counter()
        self.by_request: Counter[tuple[str, str]] = Counter()  # (method, key) -> requests seen
        self.injected: list[tuple[str, str, str]] = []  # (kind, method, key) of every fault, in order
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    def decide(self, method: str, key: str) -> tuple[str, Rule | None]:
        """The fault for this request ("" for none), counted; the rule that drew it."""
        with self._lock:
            nth = self.by_request[(method, key)]
            self.by_request[(method, key)] += 1
            self.counts["requests"] += 1
            self.counts[f"requests_{method}"] += 1
            digest = hashlib.blake2b(f"{self.seed}|{method}|{key}|{nth}".encode(), digest_size=8).digest()
            draw = int.from_bytes(digest, "big") / 2**64
            for rule in self.rules:
                if not rule.matches(method, key) or (rule.limit is not None and rule.injected >= rule.limit):
                    continue
                edge = 0.0
                for kind, rate in sorted(rule.rates.items()):
                    edge += rate
                    if draw < edge:
                        rule.injected += 1
                        self.counts[kind] += 1
                        self.injected.append((kind, method, key))
                        return kind, rule
                break  # the first matching rule decides
            return "", None

    @property
    def faults(self) -> int:
        return sum(self.counts[kind] for kind in KINDS)

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.injected.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a client that gave up (a timeout) is no news
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet: the counts say what happened
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = b""
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                chunk = self.rfile.read(size + 2)
                raw += chunk
                if size == 0:
                    while chunk not in (b"\r\n", b""):  # trailers up to the empty line
                        chunk = self.rfile.readline()
                        raw += chunk
                    return raw
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _error(self, kind: str) -> None:
        status, code, message = _ERRORS[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>capfilt-fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close the connection with a TCP RST (SO_LINGER 0): the client sees a dropped connection."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _handle(self) -> None:
        body = self._body()
        key = unquote(urlsplit(self.path).path).lstrip("/")
        kind, rule = self.owner.decide(self.command, key)
        if kind in _ERRORS:
            self._error(kind)
            return
        if kind == "delay":
            time.sleep(rule.delay_s)
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()}
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                upstream.putheader(name, value)
            upstream.endheaders(body if body else None)
            response = upstream.getresponse()
            payload = response.read()
        finally:
            upstream.close()
        if kind == "reset" and not payload:
            self._reset()  # the store acted; the answer never arrives
            return
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_HEADERS:
                self.send_header(name, value)
        length = response.getheader("Content-Length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if kind == "reset":
            self.wfile.write(payload[: len(payload) // 2])
            self._reset()
            return
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
