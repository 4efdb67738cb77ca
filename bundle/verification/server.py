"""Reference HTTP endpoint for black-box verification: serves any ``predict_proba`` model in the wire format of
:mod:`bundle.verification.blackbox` (POST to any path; JSON in, JSON out).

It stands in for a suspect's prediction API in tests and demos. It has no authentication, so it binds to loopback
addresses only unless ``allow_remote=True``. Answers: 200 with ``{"probabilities", "labels"}``; 400 for a malformed
request, 411/413 for a missing or oversized body, 500 when the model fails (``{"error": message}`` each time).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np
import torch

from bundle.data.labels import LABELS
from bundle.verification.blackbox import decode_images

__all__ = ["MAX_BODY_BYTES", "serve"]

logger = logging.getLogger(__name__)

#: Largest request body accepted (a batch of 32 images of 1024 x 1024 float32, base64-encoded, fits).
MAX_BODY_BYTES = 256 * 1024 * 1024


class _Model(Protocol):
    def predict_proba(self, images: torch.Tensor) -> np.ndarray: ...


class _ModelServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the model, its label order and a lock that serialises model calls."""

    def __init__(self, address: tuple[str, int], model: _Model, labels: Sequence[str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _PredictHandler)
        self.model = model
        self.labels = list(labels)
        self.lock = threading.Lock()


class _PredictHandler(BaseHTTPRequestHandler):
    """POST: decode the images, run the model, answer the probabilities (wire format of ``blackbox``)."""

    server: _ModelServer

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0:
            return self._reply(411, {"error": "a JSON body with Content-Length is required"})
        if length > MAX_BODY_BYTES:
            return self._reply(413, {"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"})
        try:
            request = json.loads(self.rfile.read(length))
            images = decode_images(request.get("images") if isinstance(request, dict) else None)
        except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and WireFormatError are ValueErrors
            return self._reply(400, {"error": f"malformed request: {err}"})
        try:
            with self.server.lock:
                probabilities = np.asarray(self.server.model.predict_proba(images), dtype=np.float64)
        except Exception as err:  # any model failure goes back to the client instead of dropping the connection
            logger.exception("model failed on a %s batch", tuple(images.shape))
            return self._reply(500, {"error": f"model failed: {type(err).__name__}: {err}"})
        self._reply(200, {"probabilities": probabilities.tolist(), "labels": self.server.labels})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        logger.debug("%s - " + format, self.address_string(), *args)


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
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start serving ``model`` on ``host:port`` (0: a free port) in a daemon thread; returns the server and thread.

    ``labels`` default to the model's own ``labels`` attribute, else :data:`LABELS`. The URL is
    ``f"http://{host}:{server.server_address[1]}/"``; stop with ``server.shutdown(); server.server_close()``.
    """
    if not (allow_remote or _is_loopback(host)):
        raise ValueError(
            f"refusing to serve on {host!r}: the endpoint has no authentication; use a loopback address "
            "(127.0.0.1, ::1, localhost) or pass allow_remote=True (serve_model.py: --allow-remote)"
        )
    labels = labels if labels is not None else (getattr(model, "labels", None) or LABELS)
    server = _ModelServer((host, port), model, labels)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name=f"suspect-server-{port}", daemon=True)
    thread.start()
    logger.info("serving %s on http://%s:%d/", type(model).__name__, host, port)
    return server, thread
