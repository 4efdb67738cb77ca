"""Suspect-model adapters: every black-box kind gives the same probabilities for one model; failures are clear."""

import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from torch import nn

from xmark_bundle.data.labels import LABELS
from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.classifier import build_classifier
from xmark_bundle.verification import (
    ProbabilityError,
    SuspectConnectionError,
    SuspectModelError,
    WireFormatError,
    decode_images,
    encode_images,
    open_suspect,
    serve,
)

SIZE = 64


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("resnet18").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def expected(classifier, images) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(classifier(images)).double().numpy()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, classifier):
    path = tmp_path_factory.mktemp("classifier")
    torch.save(classifier.state_dict(), path / "model.pt")
    (path / "training_info.json").write_text(json.dumps({"arch": "resnet18", "image_size": SIZE}))
    return path


def _trace(module: nn.Module, path, images) -> str:
    torch.jit.trace(module.eval(), images[:1]).save(str(path))
    return str(path)


@pytest.fixture()
def endpoint():
    """Start servers on 127.0.0.1 (port 0) and stop them after the test; yields a function model -> URL."""
    servers = []

    def start(model, **kwargs) -> str:
        server, _ = serve(model, "127.0.0.1", 0, **kwargs)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/predict"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_all_kinds_give_the_same_probabilities(tmp_path, classifier, images, expected, ckpt_dir, endpoint):
    ts = _trace(classifier, tmp_path / "suspect.ts", images)
    bundle_dir = tmp_path / "monai_bundle"
    (bundle_dir / "configs").mkdir(parents=True)
    (bundle_dir / "models").mkdir()
    network_def = {
        "_target_": "xmark_bundle.networks.classifier.build_classifier",
        "arch": "resnet18",
        "num_classes": 6,
    }
    (bundle_dir / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    torch.save({"model": classifier.state_dict()}, bundle_dir / "models" / "model.pt")  # CheckpointSaver form

    suspects = {
        "torchscript": open_suspect(ts),
        "classifier-checkpoint": open_suspect(ckpt_dir),
        "monai-bundle": open_suspect(bundle_dir),
        "http": open_suspect(endpoint(open_suspect(ckpt_dir / "model.pt"))),
    }
    for kind, suspect in suspects.items():
        assert suspect.kind == kind
        np.testing.assert_allclose(suspect.predict_proba(images), expected, atol=1e-5, err_msg=kind)
    assert suspects["torchscript"].describe()["sha256"] == sha256_file(ts)
    assert suspects["classifier-checkpoint"].describe()["sha256"] == sha256_file(ckpt_dir / "model.pt")
    assert suspects["classifier-checkpoint"].input_size == SIZE
    assert suspects["monai-bundle"].describe()["sha256"] == sha256_file(bundle_dir / "models" / "model.pt")
    assert suspects["http"].describe()["sha256"] is None
    assert suspects["http"].labels == LABELS  # stated by the endpoint

    _trace(classifier, bundle_dir / "models" / "model.ts", images)  # a bundle with model.ts prefers it
    from_ts = open_suspect(bundle_dir)
    assert from_ts.kind == "monai-bundle-torchscript"
    np.testing.assert_allclose(from_ts.predict_proba(images), expected, atol=1e-5)


def test_probability_outputs_are_not_squashed_again(tmp_path, classifier, images, expected):
    ts = _trace(nn.Sequential(classifier, nn.Sigmoid()), tmp_path / "probs.ts", images)
    np.testing.assert_allclose(open_suspect(ts, outputs="probabilities").predict_proba(images), expected, atol=1e-5)
    squashed_twice = open_suspect(ts).predict_proba(images)
    assert squashed_twice.min() >= 0.5  # sigmoid of a probability: why the option matters


def test_wire_format_round_trip_and_rejects_malformed_payloads(images):
    payload = json.loads(json.dumps(encode_images(images)))
    assert payload["shape"] == [3, 1, SIZE, SIZE] and payload["dtype"] == "float32"
    assert torch.equal(decode_images(payload), images)
    with pytest.raises(WireFormatError, match="B, 1, H, W"):
        decode_images({**payload, "shape": [3, 3, SIZE, SIZE]})
    with pytest.raises(WireFormatError, match="bytes"):
        decode_images({**payload, "shape": [2, 1, SIZE, SIZE]})
    with pytest.raises(WireFormatError, match="base64"):
        decode_images({**payload, "data": "not base64!"})


def test_unreachable_endpoint_is_a_clear_connection_error(images):
    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/predict"
    with pytest.raises(SuspectConnectionError, match=rf"{url} unreachable after 2 attempt"):
        open_suspect(url, timeout=2.0).predict_proba(images)


class _FlatScores:
    """A model answering one score per image (B instead of B x K)."""

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        return np.full(images.shape[0], 0.5)


class _NaNLogits(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 6), float("nan"))


class _ScoresPerPixelRow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)  # B x 1 x H: not B x K


def test_wrong_shapes_and_nan_outputs_name_the_model(tmp_path, images, endpoint):
    flat_url = endpoint(_FlatScores())
    with pytest.raises(SuspectModelError, match=rf"{flat_url} returned an output of shape \(3,\)"):
        open_suspect(flat_url).predict_proba(images)
    rows = _trace(_ScoresPerPixelRow(), tmp_path / "rows.ts", images)
    with pytest.raises(SuspectModelError, match=r"rows.ts returned an output of shape \(3, 1, 64\)"):
        open_suspect(rows).predict_proba(images)
    nan = _trace(_NaNLogits(), tmp_path / "nan.ts", images)
    with pytest.raises(ProbabilityError, match=r"nan.ts: 18 of 18 probabilities are NaN"):
        open_suspect(nan).predict_proba(images)
    nan_url = endpoint(open_suspect(nan))  # the server answers 500 with the model's message; 5xx is retried once
    with pytest.raises(SuspectModelError, match=r"HTTP 500 .*NaN or infinite"):
        open_suspect(nan_url).predict_proba(images)


class _NotJSON(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "9")
        self.end_headers()
        self.wfile.write(b"<html>hi!")

    def log_message(self, *args) -> None:
        pass


def test_malformed_answers_and_requests(images, endpoint, classifier):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotJSON)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SuspectModelError, match="did not answer JSON"):
            open_suspect(f"http://127.0.0.1:{server.server_address[1]}/").predict_proba(images)
    finally:
        server.shutdown()
        server.server_close()

    url = endpoint(_FlatScores())
    request = urllib.request.Request(url, data=b'{"images": [1, 2]}', headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "malformed request" in json.loads(info.value.read())["error"]


def test_bad_specs_and_hosts_are_refused(tmp_path, classifier):
    with pytest.raises(SuspectModelError, match="suspect model not found"):
        open_suspect(tmp_path / "missing.ts")
    torch.save(classifier.state_dict(), tmp_path / "weights.pt")  # a state dict is not TorchScript
    with pytest.raises(SuspectModelError, match="weights.pt: not a TorchScript model"):
        open_suspect(tmp_path / "weights.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SuspectModelError, match="neither a classifier directory"):
        open_suspect(tmp_path / "empty")
    generator_dir = tmp_path / "generator"  # configs/train.json also writes a training_info.json, without "arch"
    generator_dir.mkdir()
    (generator_dir / "training_info.json").write_text(json.dumps({"generator": "XMarkGenerator"}))
    with pytest.raises(SuspectModelError, match="holds a watermark generator .XMarkGenerator., not a classifier"):
        open_suspect(generator_dir)
    (generator_dir / "training_info.json").write_text(json.dumps({"image_size": 224}))  # neither kind
    with pytest.raises(SuspectModelError, match="cannot read the classifier architecture 'arch'"):
        open_suspect(generator_dir)
    with pytest.raises(ValueError, match="refusing to serve on '0.0.0.0'"):
        serve(_FlatScores(), host="0.0.0.0")
