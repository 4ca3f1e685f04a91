"""Latent containers and layouts: every common source lands as the same PiD latent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pid_cli.inputs.latent_files import (
    LatentError,
    parse_size,
    patchify_2x2,
    read_latent_file,
    to_pid_latent,
    to_training_frame,
)
from pid_cli.registry import Latent

FLUX = Latent(channels=16, vae_factor=8, normalisation={"kind": "affine", "shift": 0.1159, "scale": 0.3611})
FLUX2 = Latent(channels=128, vae_factor=16, patchify=2,
               normalisation={"kind": "batchnorm", "eps": 1e-4})
QWEN = Latent(channels=16, vae_factor=8, normalisation={"kind": "per_channel", "mean": list(range(16)),
                                                         "std": [2.0] * 16})
SDXL = Latent(channels=4, vae_factor=8, normalisation={"kind": "affine", "shift": 0.0, "scale": 0.13025},
              sigma_frame="euler-ve")
SIGLIP = Latent(channels=1152, vae_factor=16, fixed_grid=(16, 16), normalisation={"kind": "layernorm"})


def _convert(path, spec=FLUX, backbone="flux", **kw):
    return to_pid_latent(read_latent_file(path, kw.pop("key", None)), spec, backbone, **kw)


@pytest.fixture
def z():
    return torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy", ".npz"])
def test_every_container_reads_the_same_tensor(tmp_path, z, suffix):
    path = tmp_path / f"lat{suffix}"
    if suffix == ".safetensors":
        save_file({"latent": z}, path)
    elif suffix == ".pt":
        torch.save({"latents": z, "prompt": "hi"}, path)
    elif suffix == ".npy":
        np.save(path, z.numpy())
    else:
        np.savez(path, samples=z.numpy(), other=np.zeros(3, np.float32))
    assert torch.equal(_convert(path), z)


def test_single_chw_becomes_a_batch_of_one(tmp_path, z):
    save_file({"x": z[0]}, tmp_path / "one.safetensors")
    assert _convert(tmp_path / "one.safetensors").shape == (1, 16, 6, 10)


def test_five_d_single_frame(tmp_path, z):
    save_file({"x": z[:, :, None]}, tmp_path / "q.safetensors")
    assert torch.equal(_convert(tmp_path / "q.safetensors", QWEN, "qwenimage"), z)
    save_file({"x": torch.randn(1, 16, 3, 4, 4)}, tmp_path / "video.safetensors")
    with pytest.raises(LatentError, match="3 frames"):
        _convert(tmp_path / "video.safetensors", QWEN, "qwenimage")


def _pack_flux(z: torch.Tensor) -> torch.Tensor:
    """diffusers FluxPipeline._pack_latents, written out: [B,C,H,W] → [B,(H/2)(W/2),4C]."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def test_packed_flux_sequence_unpacks_exactly(tmp_path, z):
    packed = _pack_flux(z)  # [2, 15, 64]
    save_file({"latents": packed}, tmp_path / "p.safetensors", metadata={"height": "48", "width": "80"})
    assert torch.equal(_convert(tmp_path / "p.safetensors"), z)
    save_file({"latents": packed}, tmp_path / "nometa.safetensors")
    with pytest.raises(LatentError, match="--latent-size"):
        _convert(tmp_path / "nometa.safetensors")
    assert torch.equal(_convert(tmp_path / "nometa.safetensors", size=(6, 10)), z)  # the VAE's grid
    assert torch.equal(_convert(tmp_path / "nometa.safetensors", size=(3, 5)), z)  # the token grid
    with pytest.raises(LatentError, match=r"does not fit the 15 packed tokens.*give --latent-size 6x10"):
        _convert(tmp_path / "nometa.safetensors", size=(8, 8))


def test_packed_flux2_tokens_are_raster_order(tmp_path):
    grid = torch.randn(1, 128, 3, 5)
    tokens = grid.flatten(2).transpose(1, 2).contiguous()  # [1, 15, 128]
    save_file({"x": tokens}, tmp_path / "f2.safetensors", metadata={"latent_height": "3", "latent_width": "5"})
    assert torch.equal(_convert(tmp_path / "f2.safetensors", FLUX2, "flux2"), grid)


def test_flux2_klein_raw_32_channels_patchify_and_batchnorm(tmp_path):
    raw = torch.randn(1, 32, 8, 6)
    mean, var = torch.randn(128), torch.rand(128) + 0.5
    save_file({"x": raw}, tmp_path / "k.safetensors")
    got = _convert(tmp_path / "k.safetensors", FLUX2, "flux2", bn_stats=lambda: (mean, var))
    patched = torch.empty(1, 128, 4, 3)
    for c in range(32):  # channel c·4 + i·2 + j holds in-cell offset (i, j)
        for i in range(2):
            for j in range(2):
                patched[0, c * 4 + i * 2 + j] = raw[0, c, i::2, j::2]
    assert torch.equal(patchify_2x2(raw), patched)
    assert torch.allclose(got, (patched - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-4))


def test_qwen_raw_per_channel(tmp_path, z):
    save_file({"x": z}, tmp_path / "q.safetensors")
    got = _convert(tmp_path / "q.safetensors", QWEN, "qwenimage", fmt="raw")
    assert torch.allclose(got, (z - torch.arange(16.0)[None, :, None, None]) / 2)


@pytest.mark.parametrize("bad, message", [
    (torch.randn(1, 4, 8, 8), "4 channels fits --backbone sdxl"),
    (torch.full((1, 16, 4, 4), float("nan")), "NaN or Inf"),
    (torch.zeros(1, 16, 0, 4), "empty"),
    (torch.randn(1, 16, 2000, 2), "larger than 1024"),
    (torch.ones(1, 16, 4, 4, dtype=torch.int32), "expected floating point"),
])
def test_bad_latents_name_the_file_and_the_fix(tmp_path, bad, message):
    path = tmp_path / "bad.safetensors"
    save_file({"x": bad}, path)
    with pytest.raises(LatentError) as err:
        _convert(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_ambiguous_three_d_tensor_is_refused(tmp_path):
    path = tmp_path / "amb.safetensors"
    # [C,h,w] with C=16, or 16 packed sequences of 8 tokens that the metadata's 32x64 px image explains
    save_file({"x": torch.randn(16, 8, 64)}, path, metadata={"height": "32", "width": "64"})
    with pytest.raises(LatentError, match="--latent-format pid\\|packed"):
        _convert(path)
    assert _convert(path, fmt="pid").shape == (1, 16, 8, 64)
    assert _convert(path, fmt="packed").shape == (16, 16, 4, 8)
    save_file({"x": torch.randn(16, 64, 64)}, tmp_path / "chw.safetensors")  # no size: a plain 512 px latent
    assert _convert(tmp_path / "chw.safetensors").shape == (1, 16, 64, 64)


def test_fixed_grid_backbones(tmp_path):
    save_file({"x": torch.randn(1, 1152, 16, 16)}, tmp_path / "ok.safetensors")
    assert _convert(tmp_path / "ok.safetensors", SIGLIP, "siglip").shape == (1, 1152, 16, 16)
    save_file({"x": torch.randn(1, 1152, 8, 8)}, tmp_path / "no.safetensors")
    with pytest.raises(LatentError, match="only takes 16x16"):
        _convert(tmp_path / "no.safetensors", SIGLIP, "siglip")


def test_container_errors(tmp_path):
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(LatentError, match="cannot read latent file"):
        read_latent_file(tmp_path / "trunc.safetensors")
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, tmp_path / "two.safetensors")
    with pytest.raises(LatentError, match="--key"):
        read_latent_file(tmp_path / "two.safetensors")
    with pytest.raises(LatentError, match="no tensor named 'c'"):
        read_latent_file(tmp_path / "two.safetensors", key="c")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(LatentError, match="unsupported latent file type"):
        read_latent_file(tmp_path / "x.gif")
    with pytest.raises(LatentError, match=r"x\.pt: no such file"):
        read_latent_file(tmp_path / "x.pt")


def test_pickled_code_in_a_latent_file_is_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/pid_latent_pwned",))

    torch.save({"latent": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(LatentError, match="refused"):
        read_latent_file(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/pid_latent_pwned")


def test_sdxl_euler_frame_conversion():
    x = torch.full((4, 2, 2), 3.0)
    vp, sigma = to_training_frame(x, 2.0, "euler-ve")
    assert sigma == pytest.approx(2 / 5 ** 0.5)
    assert torch.allclose(vp, x / 5 ** 0.5)
    same, zero = to_training_frame(x, 0.0, "euler-ve")
    assert zero == 0.0 and torch.equal(same, x)
    with pytest.raises(ValueError, match="outside"):
        to_training_frame(x, 1.5, "flow")


def test_parse_size():
    assert parse_size("64x96") == (64, 96)
    with pytest.raises(ValueError):
        parse_size("64")
