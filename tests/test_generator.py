"""Tests of the watermark generators: MONAI-equivalent architecture, L-inf budget, conditioning, gradients, export."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from torch.utils.flop_counter import FlopCounterMode

from xmark_bundle.keyed.keys import CARRIER_CYCLES, GRATING_CYCLES, key_pattern_of, keyed_perturbation, secret_key
from xmark_bundle.networks.generator import DEFAULT_EPS, SSCLBWGenerator, XMarkGenerator, bounded_perturbation

CHANNELS = (8, 16, 32, 64)
FEATURES = (8, 8, 16, 16, 32, 8)
SIZE = 64


def _images(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, SIZE, SIZE, generator=gen), torch.rand(batch, 1, SIZE, SIZE, generator=gen)


def _param_count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_unconditioned_xmark_is_monai_residual_unet():
    torch.manual_seed(0)
    net = XMarkGenerator(CHANNELS, conditioning=False).eval()
    unet = UNet(2, 1, 1, CHANNELS, (2, 2, 2), num_res_units=2).eval()
    assert _param_count(net) == _param_count(unet)
    # Both register their blocks in the same order (encoder, bottleneck, decoder deepest first): copy weights over.
    buffers = ("budget", "key", "magnitude_offset")  # the stored eps, the empty key, the keyed head's offset
    ours = {k: v for k, v in net.state_dict().items() if k not in buffers}
    theirs = unet.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    net.load_state_dict({**dict(zip(ours, theirs.values(), strict=True)), **{b: getattr(net, b) for b in buffers}})
    x, _ = _images()
    with torch.no_grad():
        expected = torch.clamp(x + DEFAULT_EPS * torch.tanh(unet(x)) * (x > 0), 0, 1)  # the paper's head, written out
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(bounded_perturbation(x, unet(x), DEFAULT_EPS), expected, rtol=0, atol=1e-6)


def test_ssclbw_is_monai_basic_unet():
    torch.manual_seed(0)
    net, unet = SSCLBWGenerator(FEATURES).eval(), BasicUNet(2, 1, 1, FEATURES).eval()
    buffers = ("budget", "key", "magnitude_offset")
    ours = {k: v for k, v in net.state_dict().items() if k not in buffers}
    assert [v.shape for v in ours.values()] == [v.shape for v in unet.state_dict().values()]
    net.load_state_dict(
        {**dict(zip(ours, unet.state_dict().values(), strict=True)), **{b: getattr(net, b) for b in buffers}}
    )
    x, _ = _images()
    with torch.no_grad():
        expected = torch.clamp(x + DEFAULT_EPS * torch.tanh(unet(x)) * (x > 0), 0, 1)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: XMarkGenerator(CHANNELS), lambda: SSCLBWGenerator(FEATURES)])
def test_budget_and_range_hold_for_large_weights(make):
    torch.manual_seed(1)
    net = make()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(20.0)
        x, cam = _images(3)
        x_hat = net(x, cam)
    assert x_hat.shape == x.shape
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0
    delta = (x_hat - x).abs().amax()
    assert delta <= net.eps + 1e-6
    assert delta > 0.5 * net.eps  # the saturated head really uses the budget


def test_conditioning_on_uses_saliency():
    torch.manual_seed(2)
    net = XMarkGenerator(CHANNELS, eps=0.1).eval()
    x, cam = _images()
    with torch.no_grad():
        assert not torch.allclose(net(x, cam), net(x, cam.flip(-1)), atol=1e-6)
    with pytest.raises(ValueError, match="saliency-conditioned"):
        net(x)


def test_conditioning_off_ignores_saliency_and_has_no_projection():
    torch.manual_seed(3)
    net = XMarkGenerator(CHANNELS, eps=0.1, conditioning=False).eval()
    assert net.saliency_projection is None
    assert not any("saliency" in name for name, _ in net.named_parameters())
    x, cam = _images()
    with torch.no_grad():
        torch.testing.assert_close(net(x, cam), net(x))
        torch.testing.assert_close(net(x, cam), net(x, cam.flip(-1)))


def test_gradients_reach_every_parameter():
    torch.manual_seed(4)
    net = XMarkGenerator(CHANNELS)
    x, cam = _images()
    (net(x, cam) - x).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize(
    "make",
    [
        lambda: XMarkGenerator(CHANNELS),
        lambda: XMarkGenerator(CHANNELS, conditioning=False),
        lambda: XMarkGenerator(CHANNELS, key_cells=16),
    ],
    ids=["conditioned", "unconditioned", "keyed"],
)
def test_torchscript_matches_eager(make):
    torch.manual_seed(5)
    net = make().eval()
    scripted = torch.jit.script(net)
    x, cam = _images()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, cam), net(x, cam), rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    net = XMarkGenerator(CHANNELS)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 1, 60, 64), torch.rand(1, 1, 60, 64))
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        net(torch.rand(1, 3, 64, 64), torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="saliency shape"):
        net(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="divisible by 16"):
        SSCLBWGenerator(FEATURES)(torch.rand(1, 1, 40, 40))
    with pytest.raises(ValueError, match="eps"):
        XMarkGenerator(CHANNELS, eps=0.0)


def test_paper_scale_cost_on_meta_device():
    """Default widths at 256 px: 26.0 M params / 12.0 GMACs against 31.1 M / 51.0 GMACs (DESIGN.md section 4)."""
    macs = {}
    with torch.device("meta"):
        nets = {"xmark": XMarkGenerator(conditioning=False), "ssclbw": SSCLBWGenerator()}
        x = torch.empty(1, 1, 256, 256)
    for name, net in nets.items():
        with FlopCounterMode(display=False) as counter:
            net(x)
        macs[name] = counter.get_total_flops() / 2
    assert round(_param_count(nets["xmark"]) / 1e6, 1) == 26.0
    assert round(_param_count(nets["ssclbw"]) / 1e6, 1) == 31.1
    assert round(macs["xmark"] / 1e9, 1) == 12.0
    assert round(macs["ssclbw"] / 1e9, 1) == 51.0


def test_zero_padding_is_never_perturbed():
    torch.manual_seed(0)
    net = XMarkGenerator(channels=(4, 8, 16, 32), conditioning=False).eval()
    image = torch.rand(2, 1, 64, 64) * 0.9 + 0.05
    image[:, :, :10] = 0.0  # letterbox padding rows
    with torch.no_grad():
        out = net(image)
    assert torch.equal(out[:, :, :10], image[:, :, :10])
    assert (out[:, :, 10:] - image[:, :, 10:]).abs().max() > 0


def test_residual_blur_removes_pixel_level_texture():
    torch.manual_seed(0)
    sharp = XMarkGenerator(channels=(4, 8, 16), eps=1.0, conditioning=False).eval()
    smooth = XMarkGenerator(channels=(4, 8, 16), eps=1.0, conditioning=False, residual_blur=2).eval()
    missing, unexpected = smooth.load_state_dict(sharp.state_dict(), strict=False)  # same weights
    assert missing == ["residual_blur.0.kernel", "residual_blur.1.kernel"] and not unexpected  # checkpoints differ
    image = torch.rand(2, 1, 64, 64) * 0.1 + 0.45  # mid-grey: no clamping, tanh near-linear for small r
    with torch.no_grad():
        for net in (sharp, smooth):
            for p in net.parameters():
                p.mul_(0.3)
        res_sharp, res_smooth = sharp(image) - image, smooth(image) - image
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 2.0 - 1.0

    def nyquist(r: torch.Tensor) -> float:  # the period-2 checkerboard component, relative to the residual's size
        r = r[..., 4:-4, 4:-4] - r[..., 4:-4, 4:-4].mean()
        return float((r * checker[4:-4, 4:-4]).mean().abs() / r.abs().mean())

    assert nyquist(res_smooth) < 0.2 * nyquist(res_sharp) + 1e-4
    assert float((res_smooth - res_sharp).abs().max()) > 0  # the option changes the output
    with pytest.raises(ValueError, match="residual_blur"):
        XMarkGenerator(channels=(4, 8, 16), residual_blur=-1)


@pytest.mark.parametrize(
    "make", [lambda eps: XMarkGenerator(CHANNELS, eps=eps), lambda eps: SSCLBWGenerator(FEATURES, eps)]
)
def test_budget_is_stored_and_checked_on_loading(make):
    trained = make(8 / 255)
    state = trained.state_dict()
    assert float(state["budget"]) == pytest.approx(8 / 255)
    make(8 / 255).load_state_dict(state)  # same budget: loads
    with pytest.raises(
        RuntimeError, match=r"trained with eps = 0\.031373 \(8/255\) but the config builds eps = 0\.062745"
    ):
        make(16 / 255).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "budget"}  # a checkpoint written before the buffer existed
    rebuilt = make(16 / 255)
    with pytest.warns(UserWarning, match="no stored budget"):
        rebuilt.load_state_dict(legacy)
    assert float(rebuilt.budget) == pytest.approx(16 / 255) and rebuilt.eps == pytest.approx(16 / 255)


def test_secret_key_is_a_reproducible_sign_grid():
    key = secret_key(16, seed=3)
    assert key.shape == (1, 1, 16, 16) and set(key.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(key, secret_key(16, seed=3))
    assert abs(float((key * secret_key(16, seed=4)).mean())) < 0.25  # independent keys are uncorrelated
    assert secret_key(0, seed=3).numel() == 0
    with pytest.raises(ValueError, match="key_cells"):
        secret_key(-1, seed=0)
    with pytest.raises(ValueError, match="key_pattern"):
        secret_key(16, seed=0, pattern="stripes")


def test_grating_key_is_one_oriented_sinusoid_per_seed():
    key = secret_key(256, seed=0, pattern="grating")
    assert key.shape == (1, 1, 256, 256) and key.abs().max() <= 1.0
    assert torch.equal(key, secret_key(256, seed=0, pattern="grating"))
    power = torch.fft.fft2(key[0, 0]).abs() ** 2
    peak = int(power.argmax())
    fy, fx = peak // 256, peak % 256
    cycles = torch.tensor([min(f, 256 - f) for f in (fy, fx)], dtype=torch.float32).norm()
    assert GRATING_CYCLES[0] - 1 <= cycles <= GRATING_CYCLES[1] + 1
    near = power.roll((3 - fy, 3 - fx), (0, 1))[:7, :7].sum() + power.roll((3 + fy, 3 + fx), (0, 1))[:7, :7].sum()
    assert near > 0.8 * power.sum()  # the energy sits around one frequency (and its mirror)
    assert abs(float((key * secret_key(256, seed=1, pattern="grating")).mean())) < 0.05
    with pytest.raises(ValueError, match="key_cells >= 128"):
        secret_key(64, seed=0, pattern="grating")


@pytest.mark.parametrize("make", [XMarkGenerator, SSCLBWGenerator])
def test_keyed_watermark_signs_follow_the_key_within_budget(make):
    torch.manual_seed(2)
    widths = CHANNELS if make is XMarkGenerator else FEATURES
    net = make(widths, key_cells=8, key_seed=1).eval()
    x, cam = _images(3)
    x = x * 0.8 + 0.1  # no clamping at 0 or 1
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(5.0)  # large residuals: the sign can still only come from the key
        delta = net(x, cam) - x
    field = torch.nn.functional.interpolate(net.key, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert delta.abs().amax() <= net.eps + 1e-6
    moved = delta.abs() > 1e-4
    assert moved.float().mean() > 0.5
    assert torch.equal(torch.sign(delta[moved]), torch.sign(field.expand_as(delta)[moved]))
    torch.testing.assert_close(keyed_perturbation(x, torch.zeros_like(x), net.key, 0.1) - x, 0.05 * field.expand_as(x))


def test_independent_keys_give_uncorrelated_watermarks_from_the_same_weights():
    torch.manual_seed(0)
    ours = XMarkGenerator(CHANNELS, key_cells=16, key_seed=0).eval()
    theirs = XMarkGenerator(CHANNELS, key_cells=16, key_seed=1).eval()
    theirs.load_state_dict({**ours.state_dict(), "key": theirs.key})  # same network, another owner's key
    plain = XMarkGenerator(CHANNELS).eval()
    x, cam = _images(4)
    x = x * 0.8 + 0.1
    with torch.no_grad():
        a, b = (ours(x, cam) - x).flatten(1), (theirs(x, cam) - x).flatten(1)
    cosine = torch.nn.functional.cosine_similarity(a, b).abs().max()
    assert cosine < 0.3  # the same weights without keys would give identical residuals (cos 1)
    assert not plain.keyed and ours.keyed


def test_loading_adopts_the_checkpoint_key():
    keyed = XMarkGenerator(CHANNELS, key_cells=8, key_seed=5)
    rebuilt = XMarkGenerator(CHANNELS)  # configs that only load a generator do not know its key
    rebuilt.load_state_dict(keyed.state_dict())
    assert rebuilt.keyed and torch.equal(rebuilt.key, keyed.key)
    x, cam = _images()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, cam), keyed.eval()(x, cam), rtol=0, atol=0)
    legacy = {k: v for k, v in XMarkGenerator(CHANNELS).state_dict().items() if k != "key"}  # before keys existed
    unkeyed = XMarkGenerator(CHANNELS, key_cells=8)
    unkeyed.load_state_dict(legacy)
    assert not unkeyed.keyed


def test_carrier_key_is_band_limited_noise_that_no_other_seed_repeats():
    key = secret_key(256, seed=0, pattern="carrier")
    assert key.shape == (1, 1, 256, 256) and float(key.abs().max()) == 1.0
    assert torch.equal(key, secret_key(256, seed=0, pattern="carrier"))
    assert 0.005 < float((key.abs() == 1).float().mean()) <= 0.011  # the top 1 % clipped at the 99th percentile
    power = torch.fft.fft2(key[0, 0].double()).abs() ** 2
    frequency = torch.fft.fftfreq(256, d=1 / 256, dtype=torch.float64)
    radius = torch.sqrt(frequency[:, None] ** 2 + frequency[None, :] ** 2)
    in_band = (radius >= CARRIER_CYCLES[0] - 1) & (radius <= CARRIER_CYCLES[1] + 1)
    assert float(power[in_band].sum() / power.sum()) > 0.95  # clipping leaks little out of the band
    assert float(power.flatten().topk(8).values.sum() / power.sum()) < 0.1  # no dominant frequency: not a grating
    for seed in range(1, 20):  # the pattern is told from the field itself, as the checkpoint's key buffer is read
        other = secret_key(256, seed=seed, pattern="carrier")
        assert key_pattern_of(other) == "carrier" and key_pattern_of(secret_key(256, seed, "grating")) == "grating"
        assert abs(float((key * other).mean() / (key * key).mean())) < 0.1  # independent carriers are uncorrelated
    with pytest.raises(ValueError, match="key_cells >= 48"):
        secret_key(32, seed=0, pattern="carrier")
    assert XMarkGenerator(CHANNELS, key_cells=64, key_seed=1, key_pattern="carrier").method == "keyed_carrier"


@pytest.mark.parametrize("pattern, cells", [("cells", 8), ("grating", 128), ("carrier", 64)])
def test_other_keys_share_pattern_and_grid_but_never_equal_ours(pattern, cells):
    net = XMarkGenerator(CHANNELS, key_cells=cells, key_seed=7, key_pattern=pattern).eval()
    other = net.other_key(11)
    assert other.shape == net.key.shape and key_pattern_of(other) == key_pattern_of(net.key) == pattern
    assert torch.equal(other, secret_key(cells, 11, pattern))
    assert not torch.equal(net.other_key(7), net.key)  # our own seed is skipped
    x, cam = _images()
    with torch.no_grad():
        own = net(x, cam)
        with net.using_key(other):
            swapped = net(x, cam)
        assert torch.equal(net(x, cam), own)  # the key is back after the block
    assert not torch.equal(swapped, own)
    with pytest.raises(ValueError, match="no key"):
        XMarkGenerator(CHANNELS).other_key(0)


def test_key_magnitude_sets_the_starting_share_of_the_budget_and_travels_with_the_checkpoint():
    torch.manual_seed(0)
    half = XMarkGenerator(CHANNELS, key_cells=8, key_seed=3).eval()
    full = XMarkGenerator(CHANNELS, key_cells=8, key_seed=3, key_magnitude=0.95).eval()
    full.load_state_dict({**half.state_dict(), "magnitude_offset": full.magnitude_offset})  # same weights
    x, cam = _images()
    x = x * 0.8 + 0.1
    with torch.no_grad():
        d_half, d_full = (half(x, cam) - x).abs(), (full(x, cam) - x).abs()
    assert d_full.amax() <= full.eps + 1e-6
    assert d_full.mean() > 1.4 * d_half.mean()  # sigmoid(r + logit 0.95) against sigmoid(r), r near 0
    rebuilt = XMarkGenerator(CHANNELS)  # a loading config knows neither the key nor the magnitude
    rebuilt.load_state_dict(full.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, cam), full(x, cam), rtol=0, atol=0)
    legacy = {k: v for k, v in half.state_dict().items() if k != "magnitude_offset"}  # before key_magnitude existed
    rebuilt.load_state_dict(legacy)
    assert float(rebuilt.magnitude_offset) == 0.0
    with pytest.raises(ValueError, match="key_magnitude"):
        XMarkGenerator(CHANNELS, key_cells=8, key_magnitude=1.0)
