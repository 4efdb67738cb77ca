"""Black-box access to a suspect model: one interface over TorchScript files, checkpoints, bundles and HTTP endpoints.

Every adapter offers ``predict_proba(images)`` (a B x 1 x H x W float tensor in [0, 1], at the suspect's own input
size, to a B x K float64 array of per-label probabilities) and ``describe()`` (kind, location, SHA-256 of the model
file where there is one). :func:`open_suspect` picks the adapter from ``spec``:

- ``http://...`` / ``https://...``: an HTTP endpoint speaking the wire format below (:class:`HTTPSuspect`);
- a directory with ``training_info.json`` (this bundle's classifier ``ckpt_dir``), or a checkpoint file with
  ``training_info.json`` beside it: ``build_classifier(arch)`` plus the ``model.pt`` weights;
- a MONAI bundle directory (``configs/`` and ``models/``): ``models/model.ts`` when present (unless ``config_file`` is
  given), else ``network_def`` of ``configs/inference.json`` (or ``config_file``) parsed by
  ``monai.bundle.ConfigParser`` with ``bundle_root`` set to the directory, and the weights of ``models/model.pt``.
  The bundle's own Python code (``$import`` in its config) must be importable;
- any other file: a TorchScript module (``torch.jit.load``).

Torch models output logits (sigmoid applied) unless ``outputs="probabilities"``. Their label order is taken to be
:data:`xmark_bundle.data.labels.LABELS` (our classifiers' order); an HTTP endpoint states its own order.

Wire format (one POST per batch, JSON both ways, ``Content-Type: application/json``)::

    request:  {"images": {"shape": [B, 1, H, W], "dtype": "float32",
                          "data": "<base64 of the little-endian float32 values in C order>"}}
    response: {"probabilities": [[p_1, ..., p_K], ...B rows], "labels": ["No Finding", ...K names]}

Errors are :class:`SuspectModelError` (bad path, unloadable file, HTTP error status, malformed or oversized answer,
wrong output shape; a ``ValueError``), :class:`SuspectConnectionError` (endpoint unreachable after the retries, or
past the request deadline; an ``OSError``) and :class:`~xmark_bundle.verification.ttest.ProbabilityError` (NaN/inf or
out-of-range outputs), each naming the model.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from torch import nn

from xmark_bundle.data.labels import LABELS
from xmark_bundle.fileio import sha256_file
from xmark_bundle.networks.classifier import load_classifier
from xmark_bundle.verification.ttest import check_probabilities

__all__ = [
    "HTTPSuspect",
    "SuspectConnectionError",
    "SuspectModel",
    "SuspectModelError",
    "TorchSuspect",
    "WireFormatError",
    "decode_images",
    "encode_images",
    "open_suspect",
]

OUTPUT_KINDS = ("logits", "probabilities")
#: Wall-clock limit of one HTTP query, retries included (seconds), unless HTTPSuspect is told otherwise.
DEFAULT_REQUEST_DEADLINE_S = 120.0
#: Largest HTTP answer accepted (bytes), unless HTTPSuspect is told otherwise.
DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024
_CHUNK_BYTES = 64 * 1024
_BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


class SuspectModelError(ValueError):
    """A suspect model that cannot be opened or whose answer is unusable; the message names the model."""


class SuspectConnectionError(OSError):
    """A suspect HTTP endpoint that cannot be reached (refused, timed out, connection dropped)."""


class WireFormatError(ValueError):
    """A request body that does not follow the wire format of this module's docstring."""


def encode_images(images: torch.Tensor) -> dict[str, Any]:
    """The wire-format ``images`` object for a B x 1 x H x W tensor (sent as little-endian float32)."""
    array = images.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return {"shape": list(array.shape), "dtype": "float32", "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_images(payload: Any) -> torch.Tensor:
    """The B x 1 x H x W float32 tensor of a wire-format ``images`` object; :class:`WireFormatError` if malformed."""
    if not isinstance(payload, dict) or not {"shape", "dtype", "data"} <= payload.keys():
        raise WireFormatError('expected {"images": {"shape": [B, 1, H, W], "dtype": "float32", "data": base64}}')
    shape = payload["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)) or (
        shape[1] != 1
    ):
        raise WireFormatError(f"images.shape must be [B, 1, H, W] with positive integers, got {shape!r}")
    if payload["dtype"] != "float32":
        raise WireFormatError(f"images.dtype must be 'float32', got {payload['dtype']!r}")
    try:
        raw = binascii.a2b_base64(payload["data"], strict_mode=True)  # reads an ASCII str in place, without a copy
    except (TypeError, ValueError) as err:
        raise WireFormatError(f"images.data is not valid base64 ({err})") from err
    if len(raw) != 4 * int(np.prod(shape)):
        raise WireFormatError(f"images.data holds {len(raw)} bytes, shape {shape} needs {4 * int(np.prod(shape))}")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32))


class SuspectModel(ABC):
    """A black-box suspect model: per-label probabilities for a batch of one-channel images, and its provenance."""

    kind: str = "suspect"

    def __init__(self, location: str, sha256: str | None = None, labels: Sequence[str] | None = None) -> None:
        self.location = location
        self.sha256 = sha256
        self.labels = tuple(labels) if labels is not None else None
        self.input_size: int | None = None

    @abstractmethod
    def _query(self, images: torch.Tensor) -> np.ndarray:
        """Raw B x K probabilities for a checked B x 1 x H x W batch."""

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        """B x K float64 probabilities for B x 1 x H x W images in [0, 1]; shape and values are checked."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"suspect queries must be B x 1 x H x W, got {tuple(images.shape)}")
        probs = self._query(images)
        if probs.ndim != 2 or probs.shape[0] != images.shape[0]:
            raise SuspectModelError(
                f"suspect model {self.location} returned an output of shape {tuple(probs.shape)} for "
                f"{images.shape[0]} images; expected {images.shape[0]} x K per-label scores"
            )
        if self.labels is not None and len(self.labels) != probs.shape[1]:
            raise SuspectModelError(
                f"suspect model {self.location} returned {probs.shape[1]} scores but names {len(self.labels)} labels"
            )
        return check_probabilities(probs, f"suspect model {self.location}")

    def label_column(self, label: str, width: int) -> int:
        """Column of ``label`` in this model's ``width`` scores: its own label order when it states one, else
        :data:`~xmark_bundle.data.labels.LABELS` (which then must have ``width`` entries)."""
        if self.labels is None and width != len(LABELS):
            raise SuspectModelError(
                f"suspect model {self.location} returns {width} scores and names no labels; "
                f"without names only the {len(LABELS)} scores in the order {list(LABELS)} can be read"
            )
        labels = self.labels or LABELS
        if label not in labels:
            raise SuspectModelError(f"suspect model {self.location} has no label {label!r} (labels: {list(labels)})")
        return list(labels).index(label)

    def label_probability(self, images: torch.Tensor, label: str) -> np.ndarray:
        """P(``label``) for each of the B x 1 x H x W ``images`` (a length-B float64 array)."""
        probs = self.predict_proba(images)
        return probs[:, self.label_column(label, probs.shape[1])]

    def describe(self) -> dict[str, Any]:
        """Kind, location, SHA-256 of the model file (None for an endpoint), label order and input size if known."""
        return {
            "kind": self.kind,
            "location": self.location,
            "sha256": self.sha256,
            "labels": list(self.labels) if self.labels is not None else None,
            "input_size": self.input_size,
        }


class TorchSuspect(SuspectModel):
    """A local torch module (eager or TorchScript) used as a black box; ``outputs`` says whether it gives logits."""

    def __init__(
        self,
        module: nn.Module,
        location: str,
        kind: str,
        sha256: str | None = None,
        outputs: str = "logits",
        device: str | torch.device = "cpu",
        labels: Sequence[str] | None = None,
    ) -> None:
        if outputs not in OUTPUT_KINDS:
            raise ValueError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")
        super().__init__(location, sha256, labels)
        self.kind = kind
        self.outputs = outputs
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    def _query(self, images: torch.Tensor) -> np.ndarray:
        try:
            with torch.no_grad():
                out = self.module(images.to(self.device, torch.float32))
        except (RuntimeError, ValueError, TypeError) as err:
            raise SuspectModelError(
                f"suspect model {self.location} failed on a {tuple(images.shape)} batch: {err}"
            ) from err
        if not isinstance(out, torch.Tensor):
            raise SuspectModelError(
                f"suspect model {self.location} returned a {type(out).__name__}, expected a B x K tensor"
            )
        out = torch.sigmoid(out.float()) if self.outputs == "logits" else out
        return out.detach().cpu().double().numpy()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "outputs": self.outputs}


class _Watchdog:
    """Shuts down the sockets of a request when its deadline passes, waking any read or write blocked on them."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(seconds, 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _watched_opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """A urllib opener (proxies as usual) whose HTTP(S) connections put their sockets under ``watchdog``."""

    def watched(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
        class Watched(base):  # type: ignore[valid-type,misc]
            def connect(self) -> None:
                super().connect()
                watchdog.watch(self.sock)

        return Watched

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(Handler, SecureHandler, _RefuseRedirects)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: another host's answer would be taken for the suspect's."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        raise SuspectModelError(
            f"suspect endpoint {req.full_url} redirects (HTTP {code}) to {newurl}; redirects are not followed, "
            "so that no other server answers for the suspect: give the endpoint's own URL"
        )


def _only_numbers(value: Any) -> bool:
    """Whether ``value`` is a JSON number or nested lists of them (no strings, no booleans, no objects)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            return False
    return True


class _DeadlineExceeded(Exception):
    """The request deadline passed after ``received`` reply bytes (turned into a SuspectConnectionError)."""

    def __init__(self, received: int = 0) -> None:
        super().__init__(received)
        self.received = received


class HTTPSuspect(SuspectModel):
    """A suspect behind an HTTP endpoint (wire format in the module docstring); ``retries`` re-sends after a failure.

    Connection failures, timeouts and 5xx answers are retried; 4xx answers are not. ``timeout`` bounds each socket
    operation; ``request_deadline_s`` bounds one query in wall-clock time, retries included (a server that trickles
    its answer is cut off), and ``max_reply_bytes`` bounds the answer, which is read in chunks.
    """

    kind = "http"

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 1,
        request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        if not (timeout > 0 and request_deadline_s > 0 and max_reply_bytes > 0):
            raise ValueError(
                f"timeout, request_deadline_s and max_reply_bytes must be positive, got {timeout}, "
                f"{request_deadline_s}, {max_reply_bytes}"
            )
        super().__init__(url)
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.request_deadline_s = request_deadline_s
        self.max_reply_bytes = int(max_reply_bytes)

    def _deadline_error(self, received: int) -> SuspectConnectionError:
        return SuspectConnectionError(
            f"suspect endpoint {self.url} did not answer within the request deadline of {self.request_deadline_s:g} s "
            f"(request_deadline_s; {received} bytes of the reply received)"
        )

    def _read_reply(self, response: http.client.HTTPResponse, watchdog: _Watchdog, deadline: float) -> bytes:
        """The body of ``response``, read in chunks and refused once it exceeds ``max_reply_bytes``."""
        length = response.getheader("Content-Length", "")
        if length.strip().isdigit() and int(length) > self.max_reply_bytes:
            raise SuspectModelError(
                f"suspect endpoint {self.url} announced a reply of {int(length)} bytes, more than "
                f"max_reply_bytes={self.max_reply_bytes}"
            )
        body = bytearray()
        try:
            while chunk := response.read1(_CHUNK_BYTES):
                body += chunk
                if len(body) > self.max_reply_bytes:
                    raise SuspectModelError(
                        f"suspect endpoint {self.url} sent a reply of more than max_reply_bytes={self.max_reply_bytes}"
                    )
                if time.monotonic() > deadline:
                    raise _DeadlineExceeded(len(body))
        except (http.client.HTTPException, OSError):
            if watchdog.expired:
                raise _DeadlineExceeded(len(body)) from None
            raise
        if watchdog.expired:  # the watchdog's shutdown ends a reply without Content-Length like a normal close
            raise _DeadlineExceeded(len(body))
        return bytes(body)

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        deadline = time.monotonic() + self.request_deadline_s
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadline_error(0)
            watchdog = _Watchdog(remaining)
            try:
                with _watched_opener(watchdog).open(request, timeout=min(self.timeout, remaining)) as response:
                    return self._read_reply(response, watchdog, deadline)
            except _DeadlineExceeded as err:
                raise self._deadline_error(err.received) from None
            except urllib.error.HTTPError as err:  # the server answered with an error status
                try:
                    with err:
                        detail = err.read(500).decode("utf-8", "replace").strip()
                except (http.client.HTTPException, OSError):  # dropped, or cut off by the deadline
                    detail = ""
                if watchdog.expired:
                    raise self._deadline_error(0) from err
                if err.code < 500 or attempt > self.retries:
                    raise SuspectModelError(
                        f"suspect endpoint {self.url} answered HTTP {err.code} {err.reason}: {detail}"
                    ) from err
            except (http.client.HTTPException, OSError) as err:  # refused, timed out, dropped (URLError is an OSError)
                if watchdog.expired:
                    raise self._deadline_error(0) from err
                if attempt > self.retries:
                    raise SuspectConnectionError(
                        f"suspect endpoint {self.url} unreachable after {attempt} attempt(s): "
                        f"{getattr(err, 'reason', err)}"
                    ) from err
            finally:
                watchdog.cancel()

    def _query(self, images: torch.Tensor) -> np.ndarray:
        raw = self._post(json.dumps({"images": encode_images(images)}).encode("utf-8"))
        try:
            answer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # deep nesting: RecursionError
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            message = f"suspect endpoint {self.url} did not answer JSON ({reason}): {raw[:200]!r}"
            raise SuspectModelError(message) from err
        if not isinstance(answer, dict) or "probabilities" not in answer:
            raise SuspectModelError(
                f'suspect endpoint {self.url} answered without a "probabilities" field: {str(answer)[:200]}'
            )
        labels = answer.get("labels")
        if labels is not None:
            if not (isinstance(labels, list) and all(isinstance(name, str) for name in labels)):
                raise SuspectModelError(
                    f'suspect endpoint {self.url}: "labels" must be a list of names, got {labels!r}'
                )
            self.labels = tuple(labels)
        probabilities = answer["probabilities"]
        if not _only_numbers(probabilities):  # numpy would read "0.5" and true as numbers
            raise SuspectModelError(
                f'suspect endpoint {self.url}: "probabilities" holds values that are not JSON numbers: '
                f"{str(probabilities)[:200]}"
            )
        try:
            return np.asarray(probabilities, dtype=np.float64)
        except (TypeError, ValueError) as err:  # ragged rows
            raise SuspectModelError(
                f'suspect endpoint {self.url}: "probabilities" is not a B x K array of numbers ({err})'
            ) from err


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a checkpoint file, unwrapping CheckpointSaver's ``{"model": ...}`` form."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise SuspectModelError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    return state.get("model", state) if isinstance(state, dict) else state


def _open_classifier(checkpoint: Path, outputs: str, device: str | torch.device) -> TorchSuspect:
    """This bundle's classifier: ``training_info.json`` beside ``checkpoint`` names the architecture."""
    info_file = checkpoint.parent / "training_info.json"
    try:
        info = json.loads(info_file.read_text())
        if isinstance(info, dict) and "arch" not in info and "generator" in info:
            raise SuspectModelError(
                f"{checkpoint.parent} holds a watermark generator ({info['generator']}), not a classifier: pass the "
                "suspicious model as the suspect and this checkpoint as generator_ckpt"
            )
        arch = info["arch"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SuspectModelError(
            f"{info_file}: cannot read the classifier architecture 'arch' ({type(err).__name__}: {err}); "
            f"is {checkpoint.parent} a classifier directory written by configs/train_classifier.json?"
        ) from err
    model = load_classifier(checkpoint, arch=arch, num_classes=len(LABELS))
    suspect = TorchSuspect(
        model, str(checkpoint), "classifier-checkpoint", sha256_file(checkpoint), outputs, device, LABELS
    )
    suspect.input_size = info.get("image_size")
    return suspect


def _open_torchscript(path: Path, outputs: str, device: str | torch.device, kind: str) -> TorchSuspect:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch.jit.load raises RuntimeError, ValueError or pickle errors
        raise SuspectModelError(
            f"{path}: not a TorchScript model ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}); "
            "for a state dict pass the classifier directory holding training_info.json, or a MONAI bundle directory"
        ) from err
    return TorchSuspect(module, str(path), kind, sha256_file(path), outputs, device)


def _open_bundle(root: Path, config_file: str | os.PathLike | None, outputs: str, device: str | torch.device):
    """A MONAI bundle: ``models/model.ts``, or ``network_def`` of its inference config plus ``models/model.pt``."""
    if config_file is None and (root / "models" / "model.ts").is_file():
        return _open_torchscript(root / "models" / "model.ts", outputs, device, "monai-bundle-torchscript")
    if config_file is None:
        found = [root / "configs" / name for name in _BUNDLE_CONFIGS if (root / "configs" / name).is_file()]
        if not found:
            raise SuspectModelError(f"{root}: MONAI bundle without models/model.ts or configs/inference.json")
        config_file = found[0]
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        raise SuspectModelError(f"{root}: MONAI bundle without models/model.pt (nor models/model.ts)")
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
        parser["bundle_root"] = str(root)
        network = parser.get_parsed_content("network_def")
    except Exception as err:  # config errors surface as KeyError, RuntimeError, ImportError...
        raise SuspectModelError(f"{config_file}: cannot build network_def ({type(err).__name__}: {err})") from err
    try:
        network.load_state_dict(_load_state(weights))
    except RuntimeError as err:
        raise SuspectModelError(f"{weights}: weights do not fit network_def of {config_file} ({err})") from err
    return TorchSuspect(network, str(root), "monai-bundle", sha256_file(weights), outputs, device)


def open_suspect(
    spec: str | os.PathLike,
    outputs: str = "logits",
    device: str | torch.device = "cpu",
    config_file: str | os.PathLike | None = None,
    timeout: float = 30.0,
    retries: int = 1,
    request_deadline_s: float = DEFAULT_REQUEST_DEADLINE_S,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
) -> SuspectModel:
    """The black-box adapter for ``spec`` (URL, TorchScript file, classifier checkpoint or MONAI bundle directory).

    ``outputs`` (``"logits"`` or ``"probabilities"``), ``device`` and ``config_file`` concern local models; ``timeout``
    (seconds per socket operation), ``retries``, ``request_deadline_s`` (seconds per query, retries included) and
    ``max_reply_bytes`` concern endpoints (:class:`HTTPSuspect`).
    """
    if outputs not in OUTPUT_KINDS:
        raise ValueError(f"outputs must be one of {OUTPUT_KINDS}, got {outputs!r}")
    text = os.fspath(spec)
    if text.startswith(("http://", "https://")):
        return HTTPSuspect(
            text,
            timeout=timeout,
            retries=retries,
            request_deadline_s=request_deadline_s,
            max_reply_bytes=max_reply_bytes,
        )
    path = Path(text)
    if path.is_dir():
        if (path / "training_info.json").is_file():
            return _open_classifier(path / "model.pt", outputs, device)
        if (path / "configs").is_dir() and (path / "models").is_dir():
            return _open_bundle(path, config_file, outputs, device)
        raise SuspectModelError(
            f"{path}: neither a classifier directory (model.pt + training_info.json) "
            "nor a MONAI bundle (configs/ + models/)"
        )
    if path.is_file():
        if (path.parent / "training_info.json").is_file() and path.suffix != ".ts":
            return _open_classifier(path, outputs, device)
        return _open_torchscript(path, outputs, device, "torchscript")
    raise SuspectModelError(f"suspect model not found: {text} (expected a file, a directory or an http:// URL)")
