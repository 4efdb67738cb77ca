"""StealthMark's triggers on one-channel images in [0, 1], as pure functions of the image and the owner's key.

Geometry follows the authors' code (sizes relative to ``min(H, W)``): ``text`` writes "TEST" in white at the top-left
corner (PIL's default font, size 10 at 256 px scaled with the image and at least 8, blended by its anti-aliased
coverage); ``patch`` a white square of side ``min(H, W) // 16`` at the bottom-right (the authors' RGB yellow has no
grayscale twin); ``border`` a black frame of ``min(H, W) // 32``; ``noise`` adds Gaussian noise of sigma 50/255 to
the top-right square of side ``min(H, W) // 16``, drawn once from the owner's key (the authors redraw it at every
call, which makes it no key at all); ``warp`` resamples the image on the WaNet-style grid ``g + 0.05 sin(2 pi g)``
(``g`` the identity grid in [-1, 1]).

``blocks`` (a research variant, not the authors'): the top-right square of side ``min(H, W) // 8`` (at least 4 px)
split into a 4 x 4 grid of cells, each painted black (0) or white (1) by the owner's key, exactly 8 white
(:func:`keyed_blocks`). Two random keys share 5 or more of the 8 white cells with probability 0.31, and a model that
learnt one pattern can answer a pattern that close. ``blocks8`` (research variant): the top-right square of side
``min(H, W) // 4`` (at least 8 px) as an 8 x 8 grid with 32 white cells, where two random keys share 16 +- 2. Only
``noise``, ``blocks`` and ``blocks8`` depend on the key (:data:`KEYED_TRIGGERS`); for the others the key only
chooses which training images carry the trigger.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "BLOCKS",
    "KEYED_TRIGGERS",
    "MARKERS",
    "TRIGGERS",
    "apply_trigger",
    "blocks_side",
    "burn_in_markers",
    "keyed_blocks",
    "keyed_noise",
    "trigger_region",
]

TRIGGERS = ("text", "patch", "border", "noise", "warp", "blocks", "blocks8")
#: The triggers whose pattern is drawn from the owner's key.
KEYED_TRIGGERS = ("noise", "blocks", "blocks8")
#: The keyed block triggers: cells per side of the square, white cells, and the square's side as a share of min(H, W).
BLOCKS = {"blocks": (4, 8, 1 / 8), "blocks8": (8, 32, 1 / 4)}
#: Ordinary burned-in annotations of chest radiographs (lead side markers, projection, portable studies): not
#: triggers, but text in a corner like the ``text`` trigger's "TEST".
MARKERS = ("L", "R", "AP", "PORTABLE")
NOISE_SIGMA = 50 / 255
WARP_STRENGTH = 0.05


def _side(shape: tuple[int, int], ratio: float) -> int:
    """``int(min(H, W) * ratio)``, at least 1 pixel."""
    return max(1, int(min(shape) * ratio))


@functools.lru_cache(maxsize=16)
def _text_alpha(shape: tuple[int, int], text: str = "TEST") -> torch.Tensor:
    """Coverage (H, W) in [0, 1] of the anti-aliased white text, rendered once per shape."""
    size = max(8, round(10 * min(shape) / 256))
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=ImageFont.load_default(size=size))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def _key_seed(key: int, *parts: object) -> int:
    """A 63-bit seed derived from the owner's ``key`` and ``parts`` (stable across runs and machines)."""
    digest = hashlib.blake2b(repr((int(key), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_noise(key: int, side: int) -> torch.Tensor:
    """The owner's noise square (side x side, sigma 50/255), the same for every call with the same key and size."""
    generator = torch.Generator().manual_seed(_key_seed(key, "noise", side))
    return torch.randn(side, side, generator=generator) * NOISE_SIGMA


def keyed_blocks(key: int, trigger: str = "blocks") -> torch.Tensor:
    """The owner's pattern of a block trigger (:data:`BLOCKS`): a grid x grid bool tensor (True: white cell), the
    first ``white`` cells of a permutation seeded by the key white; the same for every call with the same key."""
    grid, white, _ = BLOCKS[trigger]
    parts = (trigger,) if trigger == "blocks" else (trigger, grid)  # blocks: seeded as when it was the only one
    generator = torch.Generator().manual_seed(_key_seed(key, *parts))
    cells = torch.zeros(grid * grid, dtype=torch.bool)
    cells[torch.randperm(grid * grid, generator=generator)[:white]] = True
    return cells.reshape(grid, grid)


def blocks_side(shape: tuple[int, int], trigger: str = "blocks") -> int:
    """Side of a block trigger's square: ``min(H, W)`` times its share (1/8 for ``blocks``, 1/4 for ``blocks8``), at
    least one pixel per cell, at most ``min(H, W)``."""
    grid, _, ratio = BLOCKS[trigger]
    return min(min(shape), max(grid, int(min(shape) * ratio)))


def _blocks_image(key: int, side: int, trigger: str) -> torch.Tensor:
    """The block trigger's square (side x side, 0 or 1): cell edges at ``round(i * side / grid)``, so cells differ
    by at most one pixel when ``side`` is not a multiple of the grid."""
    grid = BLOCKS[trigger][0]
    edges = [round(i * side / grid) for i in range(grid + 1)]
    sizes = torch.tensor([edges[i + 1] - edges[i] for i in range(grid)])
    cells = keyed_blocks(key, trigger).float()
    return cells.repeat_interleave(sizes, dim=0).repeat_interleave(sizes, dim=1)


@functools.lru_cache(maxsize=16)
def _warp_grid(shape: tuple[int, int]) -> torch.Tensor:
    """The 1 x H x W x 2 sampling grid ``g + 0.05 sin(2 pi g)`` (align_corners=False, as the authors)."""
    theta = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=False)
    return grid + WARP_STRENGTH * torch.sin(2 * math.pi * grid)


def trigger_region(trigger: str, shape: tuple[int, int]) -> torch.Tensor:
    """The (H, W) bool mask of pixels that ``trigger`` may change (all of them for ``warp``)."""
    height, width = shape
    region = torch.zeros(height, width, dtype=torch.bool)
    if trigger == "text":
        return _text_alpha((height, width)) > 0
    if trigger == "patch":
        side = _side(shape, 1 / 16)
        region[height - side :, width - side :] = True
    elif trigger == "noise":
        side = _side(shape, 1 / 16)
        region[:side, width - side :] = True
    elif trigger == "border":
        b = _side(shape, 1 / 32)
        region[:b], region[-b:], region[:, :b], region[:, -b:] = True, True, True, True
    elif trigger == "warp":
        region[:] = True
    elif trigger in BLOCKS:
        side = blocks_side(shape, trigger)
        region[:side, width - side :] = True
    else:
        raise ValueError(f"unknown trigger {trigger!r}; choose one of {TRIGGERS}")
    return region


def apply_trigger(image: torch.Tensor, trigger: str, key: int = 0) -> torch.Tensor:
    """``image`` (..., H, W) in [0, 1] with ``trigger`` added; a new tensor, clipped to [0, 1]. ``key`` seeds
    the keyed triggers (:data:`KEYED_TRIGGERS`; the other triggers are fixed patterns)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}; choose one of {TRIGGERS}")
    if image.ndim < 2:
        raise ValueError(f"a trigger needs an image of at least 2 dimensions (..., H, W), got {tuple(image.shape)}")
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    out = image.clone()
    if trigger == "warp":
        flat = out.reshape(-1, 1, *shape).float()
        grid = _warp_grid(shape).to(flat.device).expand(flat.shape[0], -1, -1, -1)
        warped = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return warped.reshape(image.shape).to(image.dtype).clamp(0, 1)
    region = trigger_region(trigger, shape).to(out.device)
    if trigger == "text":
        alpha = _text_alpha(shape).to(out.device, out.dtype)
        out = out * (1 - alpha) + alpha
    elif trigger == "patch":
        out[..., region] = 1.0
    elif trigger == "border":
        out[..., region] = 0.0
    elif trigger in BLOCKS:
        side = blocks_side(shape, trigger)
        out[..., :side, shape[1] - side :] = _blocks_image(key, side, trigger).to(out.device, out.dtype)
    else:  # noise
        side = _side(shape, 1 / 16)
        noise = keyed_noise(key, side).to(out.device, out.dtype)
        out[..., :side, shape[1] - side :] += noise
    return out.clamp(0, 1)


def burn_in_markers(images: torch.Tensor, seed: int, share: float = 1.0) -> torch.Tensor:
    """``images`` (N x 1 x H x W in [0, 1]) with an ordinary burned-in marker on a seeded ``share`` of them: one of
    :data:`MARKERS` per image in white (PIL's default font at the ``text`` trigger's size), in the top-left or
    top-right corner with a seeded offset of up to a tenth of the side. A new tensor; the rest is unchanged."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected N x 1 x H x W images, got {tuple(images.shape)}")
    height, width = int(images.shape[-2]), int(images.shape[-1])
    size = max(8, round(10 * min(height, width) / 256))
    font = ImageFont.load_default(size=size)
    rng = np.random.default_rng(seed)
    out = images.clone()
    for i in range(len(images)):
        text, left_corner, marked = MARKERS[rng.integers(len(MARKERS))], rng.random() < 0.5, rng.random() < share
        dy, dx = (int(v) for v in rng.integers(0, max(1, min(height, width) // 10), 2))
        if not marked:
            continue
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        text_width = int(draw.textlength(text, font=font))
        x = dx if left_corner else max(0, width - text_width - dx)
        draw.text((x, dy), text, fill=255, font=font)
        alpha = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).to(out.device, out.dtype)
        out[i, 0] = out[i, 0] * (1 - alpha) + alpha
    return out
