"""Colour fix and side-by-side strip: they change what they claim to change, and nothing else.

The test scene is synthetic: a smooth dark colour field plus fine texture. The "VAE decode" is that
scene area-averaged to 1/4 size (the latent's native resolution); the "PiD output" is the full-size
scene with the drift users report (dark scenes brightened, a green/blue cast).
"""

from __future__ import annotations

import pytest
import torch

from pid_cli.colorfix import METHODS, color_fix, color_stats, side_by_side, wavelet_split


def scene(h: int = 128, w: int = 192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([-0.55 + 0.2 * torch.sin(3 * xx + c) * torch.cos(2 * yy - c) for c in (0.0, 1.0, 2.0)])
    texture = 0.08 * torch.randn(3, h, w, generator=g)
    return (base + texture)[None]  # [1, 3, H, W], within (−0.95, −0.15): no clipping anywhere


def drifted(x: torch.Tensor) -> torch.Tensor:
    """Brightens dark values most (a lift toward mid-grey) and adds a green/blue cast."""
    lift = 0.15 * (1 - x) / 2
    cast = torch.tensor([0.0, 0.05, 0.03]).view(1, 3, 1, 1)
    return x + lift + cast


def vae_decode_of(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(x, 4)  # [1, 3, H/4, W/4]


def detail(x: torch.Tensor) -> float:
    """Energy of the discrete Laplacian (interior pixels): what fine texture / edges a tensor holds."""
    lap = x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1] - 4 * x[..., 1:-1, 1:-1]
    return float(lap.pow(2).sum())


def test_none_is_identity_and_bad_input_errors():
    x = scene()
    assert color_fix(x, vae_decode_of(x), "none") is x
    assert set(METHODS) == {"none", "mean-std", "wavelet"}
    with pytest.raises(ValueError, match="unknown colour fix"):
        color_fix(x, x, "histogram")
    with pytest.raises(ValueError, match="differ in batch"):
        color_fix(x, torch.cat([x, x]), "mean-std")


def test_mean_std_matches_reference_statistics():
    clean = scene()
    ref, pid = vae_decode_of(clean), drifted(clean)
    out = color_fix(pid, ref, "mean-std")
    assert out.shape == pid.shape
    torch.testing.assert_close(out.mean((2, 3)), ref.mean((2, 3)), rtol=0, atol=1e-3)
    small = vae_decode_of(out)  # statistics are matched at the reference's resolution
    torch.testing.assert_close(small.std((2, 3)), ref.std((2, 3)), rtol=0, atol=1e-3)
    # Detail is kept: the texture only gets the per-channel gain, never blurred.
    gain = ref.std((2, 3)) / vae_decode_of(pid).std((2, 3))
    torch.testing.assert_close(out - out.mean((2, 3), keepdim=True),
                               (pid - pid.mean((2, 3), keepdim=True)) * gain.view(1, 3, 1, 1), rtol=0, atol=1e-5)
    # Works unbatched, and with the reference already upscaled.
    assert color_fix(pid[0], ref[0], "mean-std").shape == pid[0].shape


def test_wavelet_replaces_only_low_frequencies():
    clean = scene()
    ref, pid = vae_decode_of(clean), drifted(clean)
    out = color_fix(pid, ref, "wavelet")
    assert out.shape == pid.shape
    change = out - pid
    assert detail(change) < 1e-3 * detail(pid)  # what changed is smooth, low-frequency colour
    high_out, _ = wavelet_split(out)
    high_pid, _ = wavelet_split(pid)
    assert (high_out - high_pid).norm() < 0.05 * high_pid.norm()  # PiD's detail survives
    before = (pid.mean((2, 3)) - ref.mean((2, 3))).abs().max()
    after = (out.mean((2, 3)) - ref.mean((2, 3))).abs().max()
    assert after < 0.1 * before  # the cast and the lift are gone


def test_wavelet_split_is_exact():
    x = scene(64, 96)
    high, low = wavelet_split(x)
    torch.testing.assert_close(high + low, x, rtol=0, atol=1e-6)
    assert detail(low) < 1e-3 * detail(x) and detail(high) > 0.99 * detail(x)


def test_color_stats_report_the_drift():
    clean = scene()
    ref, pid = vae_decode_of(clean), drifted(clean)
    s_ref, s_pid = color_stats(ref), color_stats(pid)
    assert s_pid["luma"][0] > s_ref["luma"][0] + 0.03  # brightened
    assert s_pid["mean"][1] - s_ref["mean"][1] > s_pid["mean"][0] - s_ref["mean"][0]  # green cast
    for method in ("mean-std", "wavelet"):
        s_fix = color_stats(color_fix(pid, ref, method))
        assert abs(s_fix["luma"][0] - s_ref["luma"][0]) < 0.005, method


def test_side_by_side_strip():
    a = torch.full((1, 3, 8, 12), -1.0)
    b = torch.full((3, 8, 10), 0.5)
    strip = side_by_side([a, b], gap=4)
    assert strip.shape == (3, 8, 12 + 4 + 10)
    assert (strip[:, :, :12] == -1).all() and (strip[:, :, 12:16] == 1).all() and (strip[:, :, 16:] == 0.5).all()
    small = torch.zeros(3, 4, 5)  # another height: resized to 8 rows, aspect kept
    assert side_by_side([a, small], gap=0).shape == (3, 8, 12 + 10)
    with pytest.raises(ValueError, match="at least one"):
        side_by_side([])
