"""Bounded network I/O on 127.0.0.1: the HTTP client's deadline and reply limit, the reference server's limits.

Every server here is real (raw sockets or xmark_bundle.verification.serve) and bound to loopback; every loop is bounded.
"""

import http.client
import json
import runpy
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from xmark_bundle.verification import (
    HTTPSuspect,
    SuspectConnectionError,
    SuspectModelError,
    encode_images,
    open_suspect,
    serve,
)

IMAGES = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))


class _Half:
    """A model answering 0.5 for every label."""

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        return np.full((images.shape[0], 6), 0.5)


class RawServer:
    """A one-thread TCP server on 127.0.0.1 that answers each connection with ``respond(connection, stop)``."""

    def __init__(self, respond) -> None:
        self.respond, self.stop = respond, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/predict"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(5)
                try:
                    read_request(connection)
                    self.respond(connection, self.stop)
                except OSError:  # the client gave up
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def read_request(connection: socket.socket) -> bytes:
    """Read one HTTP request (headers and Content-Length body) from `connection`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536) or b"\r\n\r\n"
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")), 0
    )
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return body


def dribble(prefix: bytes, limit: int = 60):
    """A responder that sends `prefix` then one byte every 0.5 s (at most `limit` bytes, i.e. 30 s)."""

    def respond(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(prefix)
        for _ in range(limit):
            if stop.wait(0.5):
                return
            connection.sendall(b" ")

    return respond


@pytest.fixture()
def raw_server():
    servers = []

    def start(respond) -> RawServer:
        servers.append(RawServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture()
def endpoint():
    """Reference servers on 127.0.0.1, stopped after the test."""
    servers = []

    def start(**kwargs):
        server, _ = serve(_Half(), "127.0.0.1", 0, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --- the client ---


@pytest.mark.parametrize(
    "prefix",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",  # dribbles the body
        b"HTTP/1.0 200 OK\r\nX-Slow: ",  # dribbles a header line
    ],
    ids=["body", "headers"],
)
def test_client_gives_up_on_a_dribbling_endpoint_by_the_deadline(raw_server, prefix):
    server = raw_server(dribble(prefix))
    suspect = open_suspect(server.url, timeout=30.0, retries=1, request_deadline_s=2.0)
    start = time.monotonic()
    with pytest.raises(
        SuspectConnectionError, match=rf"{server.url} did not answer within the request deadline of 2 s"
    ):
        suspect.predict_proba(IMAGES)
    assert time.monotonic() - start < 15  # 2 s deadline, generous bound; each byte came well within `timeout`


def test_oversized_replies_are_refused(raw_server):
    announced = raw_server(lambda c, _: c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 700000000\r\n\r\n{"))
    with pytest.raises(
        SuspectModelError, match=rf"{announced.url} announced a reply of 700000000 bytes, more than max"
    ):
        open_suspect(announced.url).predict_proba(IMAGES)  # the default limit (64 MiB)

    def stream(connection: socket.socket, stop: threading.Event) -> None:  # no Content-Length: ends at close
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n")
        for _ in range(64):  # 4 MiB
            connection.sendall(b"[" * 65536)

    streamed = raw_server(stream)
    with pytest.raises(SuspectModelError, match=rf"{streamed.url} sent a reply of more than max_reply_bytes=1048576"):
        open_suspect(streamed.url, max_reply_bytes=2**20).predict_proba(IMAGES)


def test_client_limits_default_and_validate(endpoint):
    server = endpoint()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    suspect = open_suspect(url)
    assert isinstance(suspect, HTTPSuspect)
    assert (suspect.request_deadline_s, suspect.max_reply_bytes) == (120.0, 64 * 2**20)
    assert suspect.predict_proba(IMAGES).shape == (2, 6)
    with pytest.raises(ValueError, match="must be positive"):
        HTTPSuspect(url, request_deadline_s=0)


# --- the reference server ---


def exchange(port: int, raw: bytes) -> tuple[int, dict]:
    """Send raw bytes to the server and parse its one HTTP answer (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def post(port: int, body: bytes, path: str = "/predict", headers: dict | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_reference_server_answers_malformed_requests_with_json_4xx(endpoint):
    port = endpoint(max_body_bytes=2**20).server_address[1]
    images = encode_images(IMAGES)
    good = json.dumps({"images": images}).encode()
    nan = json.dumps({"images": encode_images(torch.full((1, 1, 4, 4), float("nan")))}).encode()
    cases = {
        "GET": (b"GET /predict HTTP/1.0\r\n\r\n", 405),
        "PUT": (b"PUT /predict HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 405),
        "unknown method": (b"BREW /predict HTTP/1.0\r\n\r\n", 405),
        "garbage request line": (b"\x00\x01 garbage\r\n\r\n", 400),
        "bad version": (b"POST / HTTP/9z\r\n\r\n", 400),
        "unknown path": (b"POST /admin HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}", 404),
        "no Content-Length": (b"POST / HTTP/1.0\r\n\r\n{}", 411),
        "chunked": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
        "bad Content-Length": (b"POST / HTTP/1.0\r\nContent-Length: abc\r\n\r\n{}", 400),
        "negative Content-Length": (b"POST / HTTP/1.0\r\nContent-Length: -5\r\n\r\n{}", 400),
        "two Content-Lengths": (b"POST / HTTP/1.0\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
        "huge Content-Length": (b"POST / HTTP/1.0\r\nContent-Length: 1000000000000\r\n\r\n", 413),
        "empty body": (b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n", 400),
    }
    for name, (raw, expected) in cases.items():
        status, answer = exchange(port, raw)
        assert status == expected and answer["error"], (name, status, answer)
    bodies = {
        "bad JSON": b"{",
        "not UTF-8": b'{"images": "\xff"}',
        "JSON list": b"[1, 2]",
        "no images": b'{"pictures": {}}',
        "wrong channels": json.dumps({"images": {**images, "shape": [2, 3, 16, 16]}}).encode(),
        "wrong byte count": json.dumps({"images": {**images, "shape": [1, 1, 16, 16]}}).encode(),
        "wrong dtype": json.dumps({"images": {**images, "dtype": "float64"}}).encode(),
        "not base64": json.dumps({"images": {**images, "data": "not base64!"}}).encode(),
        "non-finite": nan,
        "deep nesting": b"[" * 100000 + b"]" * 100000,
        "many values": b"[" + b"[]," * 10000 + b"[]]",
    }
    for name, body in bodies.items():
        status, answer = post(port, body)
        assert status == 400 and answer["error"].startswith("malformed request"), (name, status, answer)
    assert post(port, good)[0] == 200  # still serving, and a good request works
    status, answer = post(port, good, path="/")
    assert status == 200 and len(answer["probabilities"]) == 2 and answer["labels"]


def test_oversized_body_is_answered_413_to_the_client(endpoint):
    server = endpoint(max_body_bytes=2**20)
    url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    large = torch.rand(8, 1, 512, 512)  # an 11 MB request: more than the socket buffers hold unread
    with pytest.raises(SuspectModelError, match=r"HTTP 413 .*exceeds 1048576"):  # not a reset connection
        open_suspect(url).predict_proba(large)


def test_hostile_json_is_refused_without_inflating_memory(endpoint):
    port = endpoint().server_address[1]
    body = b"[" + b"[]," * 1_000_000 + b"[]]"  # 3 MB of empty lists: about 60 MB as Python objects
    tracemalloc.start()
    try:
        status, answer = post(port, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 400
    assert peak < 4 * len(body)


def test_reference_server_times_out_idle_and_slow_clients(endpoint):
    port = endpoint(timeout=1.0).server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as idle:  # sends nothing at all
        assert idle.recv(100) == b""  # closed by the server's socket timeout, not left hanging
    status, answer = exchange(port, b"POST / HTTP/1.0\r\nContent-Length: 100\r\n\r\n{")  # 1 of 100 bytes, then stalls
    assert status == 408 and "received 1 of 100 body bytes" in answer["error"]


def handler_threads(port: int) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"suspect-handler-{port}")]


def test_reference_server_bounds_its_threads(endpoint):
    server = endpoint(max_workers=2, max_queued=2, timeout=10.0)
    port = server.server_address[1]
    threads_before = threading.active_count()
    stalled = []
    try:
        for _ in range(12):  # each sends half a request line and stalls, holding a handler while it waits
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /predict HTT")
            stalled.append(sock)
        for _ in range(100):  # the accept loop works through the 12 connections (bounded wait)
            if len(handler_threads(port)) == 2:
                break
            time.sleep(0.05)
        busy = []
        for sock in stalled[4:]:  # beyond 2 running + 2 queued: answered 503 at once
            response = http.client.HTTPResponse(sock)
            response.begin()
            busy.append((response.status, json.loads(response.read())["error"]))
        assert busy == [(503, "server busy, try again later")] * 8
        assert len(handler_threads(port)) == 2
        assert threading.active_count() - threads_before <= 2
    finally:
        for sock in stalled:
            sock.close()
    for _ in range(100):  # the stalled connections are closed: slots free again
        try:
            assert open_suspect(f"http://127.0.0.1:{port}/").predict_proba(IMAGES).shape == (2, 6)
            break
        except SuspectModelError:  # 503 while the handlers notice the closed connections
            time.sleep(0.1)
    else:
        pytest.fail("the server did not recover after the stalled clients left")
    assert len(handler_threads(port)) == 2


class _MeanLogits(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 6)


def test_serve_model_script_serves_with_limits(tmp_path):
    model = tmp_path / "suspect.ts"
    torch.jit.trace(_MeanLogits(), IMAGES[:1]).save(str(model))
    script = Path(__file__).resolve().parents[1] / "scripts" / "serve_model.py"
    command = [sys.executable, str(script), "--model", str(model), "--port", "0", "--max-workers", "2"]
    process = subprocess.Popen(
        [*command, "--max-body-bytes", "4096", "--timeout", "5"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()  # "serving ... at http://127.0.0.1:PORT/"
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].strip()
        port = int(url.rsplit(":", 1)[1].strip("/"))
        expected = torch.sigmoid(_MeanLogits()(IMAGES)).double().numpy()
        np.testing.assert_allclose(open_suspect(url).predict_proba(IMAGES), expected, atol=1e-6)
        assert exchange(port, b"GET / HTTP/1.0\r\n\r\n")[0] == 405
        with pytest.raises(SuspectModelError, match="HTTP 413"):
            open_suspect(url).predict_proba(torch.rand(4, 1, 32, 32))  # about 22 kB > 4096 bytes
    finally:
        process.terminate()
        process.wait(30)
    main = runpy.run_path(str(script))["main"]  # the error path, in-process
    with pytest.raises(SystemExit, match="serve_model: error: need max_workers >= 1"):
        main([*command[2:-1], "0"])


def _reply(body: bytes, head: bytes = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"):
    """A responder that sends one complete HTTP answer with ``body``."""

    def respond(connection: socket.socket, stop: threading.Event) -> None:
        connection.sendall(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    return respond


def test_client_never_follows_a_redirect_to_another_server(raw_server):
    elsewhere = raw_server(_reply(json.dumps({"probabilities": [[0.9] * 6] * 2}).encode()))
    moved = raw_server(_reply(b"{}", f"HTTP/1.0 302 Found\r\nLocation: {elsewhere.url}\r\n".encode()))
    with pytest.raises(SuspectModelError, match=rf"{moved.url} redirects \(HTTP 302\) to {elsewhere.url}; redirects"):
        open_suspect(moved.url).predict_proba(IMAGES)


@pytest.mark.parametrize(
    "answer, problem",
    [
        (b'{"probabilities": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
        (json.dumps({"probabilities": [["0.5"] * 6] * 2}).encode(), "holds values that are not JSON numbers"),
        (json.dumps({"probabilities": [[True] * 6] * 2}).encode(), "holds values that are not JSON numbers"),
        (json.dumps({"probabilities": [[0.5] * 6, [0.5] * 5]}).encode(), "not a B x K array of numbers"),
    ],
    ids=["deep nesting", "numeric strings", "booleans", "ragged"],
)
def test_client_refuses_answers_that_are_not_plain_numbers(raw_server, answer, problem):
    server = raw_server(_reply(answer))
    with pytest.raises(SuspectModelError, match=problem):
        open_suspect(server.url).predict_proba(IMAGES)


def test_a_busy_answer_reaches_a_client_still_sending_its_body(endpoint):
    port = endpoint(max_workers=1, max_queued=0, timeout=30.0, header_timeout=30.0).server_address[1]
    body = b"0" * (16 * 2**20)  # more than the socket buffers hold: unread, it would reset the connection
    with socket.create_connection(("127.0.0.1", port), timeout=20) as holder:
        holder.sendall(b"POST /predict HTT")  # holds the only handler
        for _ in range(100):  # bounded: until the handler has taken it
            if handler_threads(port):
                break
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            response = http.client.HTTPResponse(client)
            response.begin()
            assert (response.status, json.loads(response.read())) == (503, {"error": "server busy, try again later"})


def test_a_client_trickling_its_headers_is_cut_off_and_frees_the_server(endpoint):
    port = endpoint(max_workers=1, max_queued=0, timeout=30.0, header_timeout=1.0).server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as slow:
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # then nothing: it holds the only handler
        assert slow.recv(100) == b""  # cut after the header deadline (1 s), not the socket timeout (30 s)
        for _ in range(50):  # bounded: the handler is free again once the cut connection is closed
            try:
                assert open_suspect(f"http://127.0.0.1:{port}/").predict_proba(IMAGES).shape == (2, 6)
                break
            except SuspectModelError:  # 503 while the handler winds down
                time.sleep(0.1)
        else:
            pytest.fail("the server stayed busy after the slow client was cut off")


def test_an_announced_body_is_not_allocated_before_it_arrives(endpoint):
    port = endpoint(timeout=1.0).server_address[1]
    tracemalloc.start()
    try:
        status, answer = exchange(port, b"POST / HTTP/1.0\r\nContent-Length: 200000000\r\n\r\n{")  # 200 MB, 1 byte
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 408 and "received 1 of 200000000 body bytes" in answer["error"]
    assert peak < 20_000_000  # the announced 200 MB were never allocated
