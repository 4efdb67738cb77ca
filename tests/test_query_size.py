"""A suspect is queried at its own training size with images loaded from the original files at that size
(configs/verify_own_size.json, :class:`~xmark_bundle.networks.query_size.WatermarkAtSize`)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image
from torch import nn

from xmark_bundle.data.labels import LABELS
from xmark_bundle.networks.checkpoint import save_watermark
from xmark_bundle.networks.classifier import ResizedClassifier, build_classifier
from xmark_bundle.networks.generator import XMarkGenerator
from xmark_bundle.networks.pipeline import WatermarkPipeline, is_keyed
from xmark_bundle.networks.query_size import WatermarkAtSize, load_watermark_at_size
from xmark_bundle.networks.triggers import make_trigger
from xmark_bundle.transforms.geometry import resize_square
from xmark_bundle.verification import TorchSuspect, VerificationSettings, verify_ownership
from xmark_bundle.verification.controls import other_key_control
from xmark_bundle.verification.queries import load_letterboxed, query_samples

ROOT = Path(__file__).resolve().parents[1]
OWN, QUERY = 32, 64


def test_at_its_own_size_the_wrapper_is_the_watermark_and_elsewhere_adds_its_resized_residual():
    torch.manual_seed(0)
    blended = make_trigger("blended", image_size=OWN, seed=3).eval()
    image = torch.rand(2, 1, OWN, OWN)
    assert torch.equal(WatermarkAtSize(blended, OWN)(image), blended(image))
    large = torch.rand(2, 1, QUERY, QUERY) * 0.8 + 0.1
    wrapped = WatermarkAtSize(blended, QUERY)
    marked = wrapped(large)
    small = resize_square(large, OWN)
    expected = large + resize_square(blended(small) - small, QUERY).clamp(-blended.eps, blended.eps)
    torch.testing.assert_close(marked, expected.clamp(0, 1))
    assert float((marked - large).abs().max()) <= blended.eps + 1e-6
    # the query keeps the large image's own detail: the change is the smooth, upsampled residual only
    assert float((marked - large).abs().max()) > 0 and not torch.equal(marked, resize_square(blended(small), QUERY))
    assert (wrapped.image_size, wrapped.own_size, wrapped.method) == (QUERY, OWN, "blended")
    with pytest.raises(ValueError, match=r"expects B x 1 x 64 x 64 images, got \(2, 1, 32, 32\)"):
        wrapped(image)


def test_a_keyed_watermark_stays_keyed_so_its_control_swaps_the_key():
    torch.manual_seed(0)
    generator = XMarkGenerator((4, 8, 16), conditioning=False, key_cells=8, key_seed=0)
    surrogate = ResizedClassifier(build_classifier("resnet18"), OWN)
    pipeline = WatermarkPipeline(generator, surrogate, "classifier.layer4", image_size=OWN).eval()
    wrapped = WatermarkAtSize(pipeline, QUERY).eval()
    assert is_keyed(wrapped) and wrapped.generator is generator
    key = generator.key.clone()
    image = torch.rand(2, 1, QUERY, QUERY) * 0.8 + 0.1
    with torch.no_grad():
        ours = wrapped(image)
        control = other_key_control(wrapped, image, torch.Generator().manual_seed(1))
    assert control.shape == image.shape and not torch.allclose(control, ours)
    assert torch.equal(generator.key, key)


def _files(root: Path) -> None:
    """Six non-target PNGs of different sizes with fine stripes (lost when a 32 px copy is upsampled) and a
    datalist."""
    items = []
    for i, shape in enumerate([(90, 70), (80, 100), (64, 64), (120, 96), (70, 70), (100, 80)]):
        rows = np.arange(shape[0])[:, None] % 2 * np.ones(shape[1])
        Image.fromarray(np.round((0.3 + 0.4 * rows) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        items.append({"image": f"img{i}.png", "label": [0.0] * len(LABELS)})
    (root / "datalist.json").write_text(json.dumps({"training": [], "test": items}))


class _Recorder(nn.Module):
    """A suspect that keeps every batch it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], len(LABELS))


def test_verification_through_the_override_loads_the_files_at_the_query_size(tmp_path):
    _files(tmp_path)
    save_watermark(make_trigger("blended", image_size=OWN, seed=3), tmp_path / "blended.pt")
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs/verify.json"), str(ROOT / "configs/verify_own_size.json")])
    parser.update({"generator_ckpt": str(tmp_path / "blended.pt"), "query_size": QUERY, "bundle_root": str(ROOT)})
    watermark = parser.get_parsed_content("network_def")
    assert isinstance(watermark, WatermarkAtSize) and watermark.image_size == QUERY and watermark.own_size == OWN
    assert parser.get_parsed_content("target_label") == "No Finding"  # read from the checkpoint's record

    recorder = _Recorder()
    settings = VerificationSettings(query_size=QUERY, batch_size=6, n_samples=6)
    report = verify_ownership(
        load_watermark_at_size(tmp_path / "blended.pt", QUERY),
        TorchSuspect(recorder, "recorder", "torch"),
        tmp_path / "datalist.json",
        tmp_path / "out",
        settings,
        progress=False,
    )
    assert report["n"] == 6 and report["query_size"] == QUERY
    items, chosen, _ = query_samples(tmp_path / "datalist.json", None, settings)
    benign = recorder.seen[1]  # the first call is the verifier's probe
    torch.testing.assert_close(benign, load_letterboxed(items, chosen, QUERY))  # the files at 64 px, not upsampled
    upsampled = resize_square(load_letterboxed(items, chosen, OWN), QUERY)
    assert float((benign - upsampled).abs().mean()) > 0.05  # the stripes an upsampled 32 px copy would have lost
