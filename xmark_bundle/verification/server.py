"""Reference HTTP endpoint for black-box verification: serves any ``predict_proba`` model in the wire format of
:mod:`xmark_bundle.verification.blackbox` (POST JSON to ``/`` or ``/predict``; JSON out).

It stands in for a suspect's prediction API in loopback tests and demos. It has no authentication, so it binds to
loopback addresses only unless ``allow_remote=True``. Its resources are bounded: at most ``max_workers`` handler
threads (connections beyond ``max_workers + max_queued`` are answered 503, their requests drained briefly so the
answer is not reset under the client), a deadline for the request line and
headers (``header_timeout``: a client that trickles them, or idles between keep-alive requests, is cut off and frees
its thread), a socket timeout and a total deadline for reading each body, and a body limit checked from
``Content-Length`` before anything is read (the body buffer then grows with what arrives, never to the announced
size up front). Every answer is
JSON: 200 with ``{"probabilities", "labels"}``, else ``{"error": message}`` with 400 (malformed request line, header,
JSON, wire format, shapes or non-finite values), 404 (unknown path), 405 (not POST), 408 (body too slow), 411
(no ``Content-Length``), 413 (body too large), 500 (the model failed) or 503 (busy).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import torch

from xmark_bundle.data.labels import LABELS
from xmark_bundle.verification.blackbox import decode_images

__all__ = ["MAX_BODY_BYTES", "serve"]

logger = logging.getLogger(__name__)

#: Largest request body accepted by default (a batch of 32 images of 1024 x 1024 float32, base64-encoded, fits).
MAX_BODY_BYTES = 256 * 1024 * 1024
#: Paths that answer predictions.
PATHS = ("/", "/predict")
_MAX_JSON_COMMAS = 1000  # a wire-format request has a handful; a body of many tiny JSON values costs 20x its size
_MAX_REFUSALS = 32  # refused connections drained at once (by the watchdog); past that a refusal closes at once
_LINGER_S = 2.0  # how long an unread body is drained after an error answer, so the client can read that answer


class _Model(Protocol):
    def predict_proba(self, images: torch.Tensor) -> np.ndarray: ...


class _ModelServer(ThreadingHTTPServer):
    """HTTP server handing connections to a fixed pool of threads; holds the model and serialises its calls."""

    def __init__(
        self,
        address: tuple[str, int],
        model: _Model,
        labels: Sequence[str],
        max_workers: int,
        max_queued: int,
        max_body_bytes: int,
        timeout: float,
        header_timeout: float,
    ) -> None:
        if max_workers < 1 or max_queued < 0 or max_body_bytes < 1 or timeout <= 0 or header_timeout <= 0:
            raise ValueError(
                f"need max_workers >= 1, max_queued >= 0, max_body_bytes >= 1, timeout > 0 and header_timeout > 0, "
                f"got {max_workers}, {max_queued}, {max_body_bytes}, {timeout}, {header_timeout}"
            )
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _PredictHandler)
        self.model = model
        self.labels = list(labels)
        self.lock = threading.Lock()
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout
        self.header_timeout_s = header_timeout
        self.port = self.server_address[1]
        self.pool = ThreadPoolExecutor(max_workers, thread_name_prefix=f"suspect-handler-{self.port}")
        self.slots = threading.BoundedSemaphore(max_workers + max_queued)
        # header deadlines of the connections being read: one watchdog thread for all of them, not one per request
        self.header_deadlines: dict[socket.socket, float] = {}
        self.lock_deadlines = threading.Lock()
        self.refused: dict[socket.socket, float] = {}  # connections answered 503, drained until these deadlines
        self.closing = threading.Event()
        self.watchdog = threading.Thread(target=self._cut_late_headers, name=f"suspect-watchdog-{self.port}")
        self.watchdog.daemon = True
        self.watchdog.start()

    def _cut_late_headers(self) -> None:
        """Shut down every connection whose request line and headers are overdue (slowloris, idle keep-alive), and
        drain the requests of refused connections until their clients leave or their time is up."""
        while not self.closing.wait(0.1):
            now = time.monotonic()
            with self.lock_deadlines:
                late = [sock for sock, deadline in self.header_deadlines.items() if deadline < now]
                for sock in late:
                    del self.header_deadlines[sock]
                done = [sock for sock, deadline in self.refused.items() if deadline < now or not _drain(sock)]
                for sock in done:
                    del self.refused[sock]
            for sock in late:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for sock in done:
                sock.close()
        with self.lock_deadlines:
            for sock in self.refused:
                sock.close()
            self.refused.clear()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """Queue the connection for the pool, or answer 503 at once when every slot is taken."""
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_response(503, {"error": "server busy, try again later"}))
                request.shutdown(socket.SHUT_WR)
                request.setblocking(False)
            except OSError:
                request.close()
                return
            # its request is still unread: closing now would reset the connection under the 503 (the client would
            # see a broken pipe instead), so the watchdog drains it for at most _LINGER_S seconds first
            with self.lock_deadlines:
                if len(self.refused) < _MAX_REFUSALS:
                    self.refused[request] = time.monotonic() + _LINGER_S
                    return
            request.close()
            return
        try:
            self.pool.submit(self._handle, request, client_address)
        except RuntimeError:  # the pool was shut down by server_close
            self.slots.release()
            self.shutdown_request(request)

    def _handle(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)  # ThreadingMixIn: handle, log errors, close
        finally:
            self.slots.release()

    def server_close(self) -> None:
        self.closing.set()
        super().server_close()
        self.pool.shutdown(wait=False)  # queued connections are still answered, then the threads end


def _response(status: int, body: dict[str, Any]) -> bytes:
    """A complete HTTP/1.0 response carrying ``body`` as JSON (for answers sent outside a handler)."""
    data = json.dumps(body).encode("utf-8")
    reason = BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    head = f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode("latin-1") + data


class _PredictHandler(BaseHTTPRequestHandler):
    """POST: decode the images, run the model, answer the probabilities (wire format of ``blackbox``)."""

    server: _ModelServer

    def setup(self) -> None:
        self.timeout = self.server.timeout_s  # StreamRequestHandler applies it to the connection socket
        self.body_read = False
        super().setup()

    def _header_deadline(self, start: bool) -> None:
        """Put this connection under the server's header watchdog (``start``), or take it off."""
        with self.server.lock_deadlines:
            if start:
                self.server.header_deadlines[self.connection] = time.monotonic() + self.server.header_timeout_s
            else:
                self.server.header_deadlines.pop(self.connection, None)

    def handle_one_request(self) -> None:
        """One request, its request line and headers within ``header_timeout`` (or the watchdog cuts it off)."""
        self._header_deadline(True)
        try:
            super().handle_one_request()
        finally:
            self._header_deadline(False)

    def parse_request(self) -> bool:
        """http.server's parsing of the request line and headers; the header deadline ends with it."""
        try:
            return super().parse_request()
        finally:
            self._header_deadline(False)

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        if urlsplit(self.path).path not in PATHS:
            return self._reply(404, {"error": f"unknown path {self.path!r}; POST to one of {list(PATHS)}"})
        lengths = {text.strip() for text in self.headers.get_all("Content-Length", [])}
        if "Transfer-Encoding" in self.headers or not lengths:
            return self._reply(411, {"error": "a JSON body with Content-Length is required (no Transfer-Encoding)"})
        declared = lengths.pop()
        if lengths or not (declared.isascii() and declared.isdigit()):
            return self._reply(400, {"error": f"invalid Content-Length {self.headers.get_all('Content-Length')}"})
        length = int(declared)
        if length > self.server.max_body_bytes:
            return self._reply(413, {"error": f"body of {length} bytes exceeds {self.server.max_body_bytes}"})
        body = self._read_body(length)
        if body is None:
            return None
        if body.count(b",") > _MAX_JSON_COMMAS:  # refuse before parsing into millions of Python objects
            return self._reply(400, {"error": "malformed request: far more JSON values than the wire format has"})
        try:
            text = body.decode("utf-8")
            del body  # decoded once; neither the bytes nor the text outlive their use
            request = json.loads(text)
            del text
            images = decode_images(request.get("images") if isinstance(request, dict) else None)
        except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSON and wire-format errors
            return self._reply(400, {"error": f"malformed request: {err}"})
        if not torch.isfinite(images).all():
            return self._reply(400, {"error": "malformed request: images contain NaN or infinite values"})
        try:
            with self.server.lock:
                probabilities = np.asarray(self.server.model.predict_proba(images), dtype=np.float64)
        except Exception as err:  # any model failure goes back to the client instead of dropping the connection
            logger.exception("model failed on a %s batch", tuple(images.shape))
            return self._reply(500, {"error": f"model failed: {type(err).__name__}: {err}"})
        self._reply(200, {"probabilities": probabilities.tolist(), "labels": self.server.labels})

    def _read_body(self, length: int) -> bytearray | None:
        """The ``length`` body bytes, read within the server's timeout into a buffer that grows with what arrives
        (an announced size costs nothing until sent); None after answering 408."""
        body = bytearray()
        deadline = time.monotonic() + self.server.timeout_s
        try:
            while len(body) < length and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(1 << 20, length - len(body)))
                if not chunk:
                    break
                body += chunk
        except OSError:  # socket timeout or reset
            pass
        received = len(body)
        if received < length:
            self._reply(408, {"error": f"received {received} of {length} body bytes within {self.server.timeout_s} s"})
            return None
        self.body_read = True
        if length == 0:
            self._reply(400, {"error": "empty body; a JSON request is required"})
            return None
        return body

    def _method_not_allowed(self) -> None:
        self._reply(405, {"error": f"method {self.command} not allowed; POST a JSON request"})

    do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _method_not_allowed  # noqa: N815

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line or headers, unknown method) as JSON."""
        self.close_connection = True
        reason = message or self.responses.get(code, ("error",))[0]
        if code == 501:  # an unsupported method is the client's error here
            code, reason = 405, f"method {self.command} not allowed; POST a JSON request"
        self._reply(code, {"error": reason})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        if self.request_version == "HTTP/0.9":  # http.server's guess for a broken request line: answer with headers
            self.request_version = "HTTP/1.0"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "POST")
        if status != 200:
            self.send_header("Connection", "close")
            self.close_connection = True
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer: nothing to tell it
            self.close_connection = True

    def finish(self) -> None:
        super().finish()
        if not self.body_read:
            _linger(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        logger.debug("%s - " + format, self.address_string(), *args)


def _linger(connection: socket.socket) -> None:
    """Drain (briefly) a body that was not read, so that closing does not reset the connection under the answer."""
    try:
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(_LINGER_S)
        deadline = time.monotonic() + _LINGER_S
        while time.monotonic() < deadline and connection.recv(1 << 16):
            pass
    except OSError:
        pass


def _drain(connection: socket.socket) -> bool:
    """Read what a non-blocking connection holds; False once its client has closed it (or it failed)."""
    try:
        while connection.recv(1 << 16):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: _Model,
    host: str = "127.0.0.1",
    port: int = 0,
    labels: Sequence[str] | None = None,
    allow_remote: bool = False,
    max_workers: int = 4,
    max_queued: int = 16,
    max_body_bytes: int = MAX_BODY_BYTES,
    timeout: float = 30.0,
    header_timeout: float = 5.0,
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start serving ``model`` on ``host:port`` (0: a free port) in a daemon thread; returns the server and thread.

    ``labels`` default to the model's own ``labels`` attribute, else :data:`LABELS`. ``max_workers`` handler threads
    serve at most ``max_workers + max_queued`` connections at a time; ``timeout`` (seconds) bounds each socket
    operation and the reading of a body, ``header_timeout`` the request line and headers (keep-alive idling
    included); bodies over ``max_body_bytes`` are refused (413). The URL is
    ``f"http://{host}:{server.server_address[1]}/"``; stop with ``server.shutdown(); server.server_close()``.
    """
    if not (allow_remote or _is_loopback(host)):
        raise ValueError(
            f"refusing to serve on {host!r}: the endpoint has no authentication; use a loopback address "
            "(127.0.0.1, ::1, localhost) or pass allow_remote=True (serve_model.py: --allow-remote)"
        )
    labels = labels if labels is not None else (getattr(model, "labels", None) or LABELS)
    server = _ModelServer((host, port), model, labels, max_workers, max_queued, max_body_bytes, timeout, header_timeout)
    thread = threading.Thread(target=server.serve_forever, name=f"suspect-server-{server.port}", daemon=True)
    thread.start()
    logger.info("serving %s on http://%s:%d/", type(model).__name__, host, server.port)
    return server, thread
