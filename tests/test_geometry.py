"""Tests for the letterbox geometry, ResizeLongestPadd (forward, MONAI inverse, collation) and unletterbox."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset, MetaTensor, decollate_batch
from monai.transforms import Compose, EnsureTyped, Invertd, Resize, Resized, ScaleIntensityRanged, SpatialPadd

from xmark_bundle.transforms import GEOMETRY_KEY, ResizeLongestPadd, letterbox, letterbox_geometry, unletterbox


def smooth_image(height: int, width: int) -> torch.Tensor:
    """A 1 x H x W low-frequency test image with values in [0.2, 0.8]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return (0.5 + 0.3 * torch.sin(2 * math.pi * yy) * torch.cos(3 * math.pi * xx))[None]


@pytest.mark.parametrize(
    ("shape", "size", "resized", "pad"),
    [
        ((300, 400), 256, [192, 256], [32, 32, 0, 0]),  # landscape
        ((2000, 1600), 256, [256, 205], [0, 0, 25, 26]),  # portrait, 204.8 rounds up, odd padding
        ((100, 100), 64, [64, 64], [0, 0, 0, 0]),  # square
        ((3, 5), 4, [2, 4], [1, 1, 0, 0]),  # tiny: 2.4 rounds down
        ((5, 8), 4, [2, 4], [1, 1, 0, 0]),  # exact tie 2.5 rounds half to even
        ((7, 8), 4, [4, 4], [0, 0, 0, 0]),  # tie 3.5 rounds half to even (up)
        ((30, 50), 64, [38, 64], [13, 13, 0, 0]),  # enlarging
    ],
)
def test_letterbox_geometry_cases(shape, size, resized, pad):
    geometry = letterbox_geometry(shape, size)
    assert geometry == {"original_shape": list(shape), "resized_shape": resized, "pad": pad, "spatial_size": size}


def test_letterbox_geometry_rejects_bad_input():
    with pytest.raises(ValueError, match="too elongated"):
        letterbox_geometry((1, 1000), 256)
    with pytest.raises(ValueError, match="positive 2-D shape"):
        letterbox_geometry((0, 10), 256)


def test_geometry_agrees_with_monai_on_many_shapes():
    """Stored geometry, output placement and affine are exactly MONAI's Resize + SpatialPad, rounding ties included."""
    rng = np.random.default_rng(0)
    shapes = [(5, 8), (7, 8), (3, 5), *(tuple(int(v) for v in rng.integers(10, 300, size=2)) for _ in range(60))]
    for size in (32, 224):
        transform = ResizeLongestPadd("image", size)
        monai_letterbox = Compose(
            [
                Resized("image", size, size_mode="longest", mode="bilinear", anti_aliasing=True),
                SpatialPadd("image", (size, size), method="symmetric"),
            ]
        )
        for index, shape in enumerate(shapes):
            geometry = letterbox_geometry(shape, size)
            resized = Resize(size, size_mode="longest")(torch.ones(1, *shape))
            assert list(resized.shape[1:]) == geometry["resized_shape"], (shape, size)
            out = transform({"image": MetaTensor(torch.ones(1, *shape))})["image"]
            rows = torch.nonzero(out[0].sum(dim=1)).flatten()
            cols = torch.nonzero(out[0].sum(dim=0)).flatten()
            top, bottom, left, right = geometry["pad"]
            assert (rows[0].item(), size - 1 - rows[-1].item()) == (top, bottom), (shape, size)
            assert (cols[0].item(), size - 1 - cols[-1].item()) == (left, right), (shape, size)
            assert out.meta[GEOMETRY_KEY] == geometry
            if index < 10:  # MONAI's Gaussian pre-filter is slow: compare the affine on a few shapes
                reference = monai_letterbox({"image": MetaTensor(torch.ones(1, *shape))})["image"]
                torch.testing.assert_close(out.affine, reference.affine, atol=1e-9, rtol=0)


def test_forward_pads_with_exact_zeros_keeps_the_rim_and_the_input():
    """Padding is exactly zero, content keeps its range up to the border, the input is left untouched."""
    image = MetaTensor(smooth_image(90, 60))
    before = image.clone()
    out = ResizeLongestPadd("image", 48)({"image": image})["image"]
    top, bottom, left, right = out.meta[GEOMETRY_KEY]["pad"]
    assert out.shape == (1, 48, 48) and out.dtype == torch.float32
    assert (left, right) == (8, 8) and (top, bottom) == (0, 0)
    assert torch.count_nonzero(out[..., :left]) == 0 and torch.count_nonzero(out[..., 48 - right :]) == 0
    content = out[..., left : 48 - right]
    assert content.min() > 0.199 and content.max() < 0.801  # no darkened rim (MONAI's zero-padded Gaussian has one)
    assert torch.equal(image, before) and GEOMETRY_KEY not in image.meta and not image.applied_operations
    ones = ResizeLongestPadd("image", 64)({"image": MetaTensor(torch.ones(1, 500, 400))})["image"]
    assert ones.meta[GEOMETRY_KEY]["pad"] == [0, 0, 6, 7]
    torch.testing.assert_close(ones[..., 6:57], torch.ones(1, 64, 51), atol=1e-6, rtol=0)


def test_numpy_input_becomes_float32_metatensor():
    out = ResizeLongestPadd("image", 16)({"image": np.ones((1, 8, 4), dtype=np.uint8)})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == (1, 16, 16)


def test_enlarging_is_plain_bilinear():
    """Only shrinking is antialiased: enlarging equals unsmoothed bilinear interpolation (as in MONAI)."""
    image = smooth_image(20, 32)
    out = ResizeLongestPadd("image", 64)({"image": MetaTensor(image)})["image"]
    top, bottom, _, _ = out.meta[GEOMETRY_KEY]["pad"]
    expected = F.interpolate(image[None], size=(40, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out[:, top : 64 - bottom].as_tensor(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("shape", "size"), [((600, 450), 128), ((40, 56), 64)])
def test_round_trip_matches_original(shape, size):
    """Letterbox then unletterbox reproduces a smooth image everywhere, borders included."""
    image = smooth_image(*shape)
    out = ResizeLongestPadd("image", size)({"image": MetaTensor(image)})["image"]
    back = unletterbox(out, out.meta[GEOMETRY_KEY])
    assert back.shape == image.shape and not isinstance(back, MetaTensor)
    assert (back - image).abs().max() < 1e-2
    batch = torch.stack([image, 1 - image])  # the pure functions take a batch sharing one geometry
    letterboxed = letterbox(batch, out.meta[GEOMETRY_KEY])
    torch.testing.assert_close(letterboxed[0], out.as_tensor())
    torch.testing.assert_close(unletterbox(letterboxed, out.meta[GEOMETRY_KEY])[1], 1 - back)


def test_constant_residual_maps_back_to_the_same_constant():
    """Padding is cropped (whatever it holds) and a constant residual stays that constant on the original grid."""
    for shape, size, atol in (((1955, 1841), 256, 0.0), ((100, 60), 256, 1e-6)):
        geometry = letterbox_geometry(shape, size)
        top, bottom, left, right = geometry["pad"]
        residual = torch.full((2, 1, size, size), 7.0)
        residual[..., top : size - bottom, left : size - right] = -0.0627
        back = unletterbox(residual, geometry)
        assert back.shape == (2, 1, *shape)
        torch.testing.assert_close(back, torch.full_like(back, -0.0627), atol=atol, rtol=0)


def test_unletterbox_rejects_wrong_shape():
    with pytest.raises(ValueError, match="C x 64 x 64"):
        unletterbox(torch.zeros(1, 64, 63), letterbox_geometry((30, 50), 64))


def test_monai_inverse_restores_shape_and_trace():
    image = MetaTensor(smooth_image(75, 120))
    transform = ResizeLongestPadd("image", 64)
    out = transform({"image": image})
    assert len(out["image"].applied_operations) == 1
    restored = transform.inverse(out)["image"]
    assert restored.shape == (1, 75, 120)
    assert not restored.applied_operations and GEOMETRY_KEY not in restored.meta
    torch.testing.assert_close(restored.affine, image.affine)


def test_dataset_dataloader_collates_geometry_of_different_sizes():
    shapes = [(30, 50), (41, 23), (16, 16)]
    data = [{"image": smooth_image(*shape).numpy()} for shape in shapes]
    preprocessing = Compose([EnsureTyped("image"), ResizeLongestPadd("image", 32)])
    batch = next(iter(DataLoader(Dataset(data, preprocessing), batch_size=3, num_workers=0)))
    assert batch["image"].shape == (3, 1, 32, 32)
    collated = batch["image"].meta[GEOMETRY_KEY]
    assert collated["original_shape"][0].tolist() == [30, 41, 16]
    inverter = Invertd("image", preprocessing, orig_keys="image")
    for item, shape in zip(decollate_batch(batch), shapes, strict=True):
        geometry = item["image"].meta[GEOMETRY_KEY]
        assert geometry == letterbox_geometry(shape, 32)
        assert unletterbox(item["image"], geometry).shape == (1, *shape)
        assert inverter(item)["image"].shape == (1, *shape)


def test_clip_to_unit_range_is_identity_inside_it():
    """The configs' intensity step: MONAI ScaleIntensityRanged(0, 1 -> 0, 1, clip) leaves [0, 1] data untouched."""
    image = torch.tensor([[[-0.25, 0.0, 0.123456789, 1.0, 1.5]]])
    clip = ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)
    out = clip({"image": image})["image"]
    assert torch.equal(out.as_tensor(), torch.tensor([[[0.0, 0.0, 0.123456789, 1.0, 1.0]]]))
