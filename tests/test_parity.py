"""The network and sampler reproduce upstream's golden tensors for every released family."""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY, TINY_VARIANTS, tiny_config, tiny_fixture
from safetensors.torch import load_file

from pid_cli.model import PiDConfig, PiDNet, load_weights, read_state_dict
from pid_cli.sampler import sample

WEIGHT_FILES = ("model_ema_bf16.pth", "model_fp32.safetensors")


def _net(variant: str, weights: str) -> PiDNet:
    net = PiDNet(PiDConfig.from_dict(tiny_config(variant))).eval()
    return load_weights(net, PARITY / variant / weights)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, max_tol: float, rel_tol: float | None, what: str):
    """The fixture README's pass criteria: max |Δ| and relative L2."""
    diff = (got.float() - ref).abs().max().item()
    assert diff <= max_tol, f"{what}: max |Δ| {diff:.3g} > {max_tol:.3g}"
    if rel_tol is not None:
        rel = ((got.float() - ref).norm() / ref.norm()).item()
        assert rel <= rel_tol, f"{what}: relative L2 {rel:.3g} > {rel_tol:.3g}"


@pytest.mark.parametrize("weights", WEIGHT_FILES)
@pytest.mark.parametrize("variant", TINY_VARIANTS)
@pytest.mark.parametrize("pixel_chunk", [8192, 7])
def test_forward_matches_upstream(variant: str, weights: str, pixel_chunk: int):
    """Also with the per-pixel work cut into uneven chunks of 7 patch tokens (crossing images)."""
    fx = tiny_fixture(variant)
    net = _net(variant, weights)
    net.pixel_chunk = pixel_chunk
    with torch.no_grad():
        out = net(fx["x"], fx["t"], fx["y"], fx["lq_latent"], fx["degrade_sigma"])
    assert out.shape == fx["out"].shape and out.dtype == torch.float32
    _assert_close(out, fx["out"], 1e-4 * max(1.0, fx["out"].abs().max().item()), 1e-5, f"{variant} out")


@pytest.mark.parametrize("weights", WEIGHT_FILES)
@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_sampler_trace_matches_upstream(variant: str, weights: str):
    """Every intermediate state of the 4-step chain, then the clamped sample."""
    fx = tiny_fixture(variant)
    net = _net(variant, weights)
    states: list[torch.Tensor] = []
    out = sample(net, fx["chain_x_0"], fx["chain_y"], fx["chain_lq_latent"], fx["chain_degrade_sigma"],
                 eps=[fx[f"chain_eps_{i}"] for i in (1, 2, 3)], callback=lambda k, x: states.append(x))
    assert len(states) == 4
    for k in (1, 2, 3):
        ref = fx[f"chain_x_{k}"]
        _assert_close(states[k - 1], ref, 1e-4 * max(1.0, ref.abs().max().item()), 1e-5, f"{variant} chain_x_{k}")
    _assert_close(out, fx["chain_sample"], 2e-4, None, f"{variant} chain_sample")
    assert torch.equal(out, states[-1].clamp(-1, 1))


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_bf16_file_equals_fp32_file(variant: str):
    bf16 = read_state_dict(PARITY / variant / "model_ema_bf16.pth")
    fp32 = read_state_dict(PARITY / variant / "model_fp32.safetensors")
    assert bf16.keys() == fp32.keys()
    for key in bf16:
        assert bf16[key].dtype == torch.bfloat16
        assert torch.equal(bf16[key].float(), fp32[key]), key


def test_flux2_unpatchify_matches_upstream():
    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2")))
    got = net.lq_proj.unpatchify_latent(fx["aux_unpatchify_in"])
    assert torch.equal(got, fx["aux_unpatchify_out"])


@pytest.mark.parametrize("variant", ["v1_flux", "v15_flux2"])
def test_every_branch_changes_the_output(variant: str):
    """Guards against a branch silently becoming a no-op (e.g. the latent or σ ignored)."""
    fx = tiny_fixture(variant)
    net = _net(variant, "model_fp32.safetensors")
    args = [fx["x"], fx["t"], fx["y"], fx["lq_latent"], fx["degrade_sigma"]]
    with torch.no_grad():
        base = net(*args)
        for index, changed in [(3, torch.zeros_like(fx["lq_latent"])), (4, fx["degrade_sigma"] + 0.4),
                               (2, fx["y"].flip(1)), (1, fx["t"].flip(0))]:
            moved = net(*[changed if i == index else a for i, a in enumerate(args)])
            assert ((moved - base).norm() / base.norm()) > 0.01, f"input {index} has no effect"


def test_fixture_inputs_are_loaded_as_float32():
    raw = load_file(PARITY / "v1_flux" / "fixture.safetensors")
    assert raw["x"].dtype == torch.float16  # the README's convention this suite relies on
