"""Schedule subsampling, noise determinism and the bf16 dtype policy."""

from __future__ import annotations

import pytest
import torch
from conftest import PARITY, tiny_config, tiny_fixture

from pid_cli.model import PiDConfig, PiDNet, load_weights
from pid_cli.sampler import STUDENT_T_LIST, draw_noise, sample, schedule, step


def test_default_schedule_is_the_fixture_schedule():
    fx = tiny_fixture("v1_flux")
    assert torch.equal(torch.tensor(STUDENT_T_LIST, dtype=torch.float32), fx["chain_t_list"])
    assert schedule(4) == list(STUDENT_T_LIST)


def test_fewer_steps_subsample_like_upstream():
    assert schedule(1) == [1.0, 0.0]
    assert schedule(2) == [0.999, 0.634, 0.0]
    assert schedule(3) == [0.999, 0.866, 0.342, 0.0]


@pytest.mark.parametrize("steps", [0, 5, 8])
def test_more_steps_than_the_schedule_is_an_error(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and 4"):
        schedule(steps)


class _Recorder(torch.nn.Module):
    """A stand-in network that records the timesteps it is called with and predicts v = x."""

    def __init__(self):
        super().__init__()
        self.ts: list[float] = []

    def forward(self, x, t, y, lq, sigma):
        self.ts.append(t[0].item())
        return x


def test_sampler_calls_the_net_once_per_step_with_scaled_t():
    rec = _Recorder()
    sample(rec, torch.zeros(1, 3, 4, 4), None, None, torch.zeros(1), t_list=schedule(3),
           generator=torch.Generator().manual_seed(0))
    assert rec.ts == [999.0, 866.0, 342.0]


def test_sampler_rejects_bad_schedules():
    with pytest.raises(ValueError, match="end at 0"):
        sample(_Recorder(), torch.zeros(1, 3, 4, 4), None, None, torch.zeros(1), t_list=[0.9, 0.5])
    with pytest.raises(ValueError, match="eps must hold 3"):
        sample(_Recorder(), torch.zeros(1, 3, 4, 4), None, None, torch.zeros(1), eps=[torch.zeros(1)])


def test_seeded_generator_reproduces_and_per_item_generators_are_batch_invariant():
    net = PiDNet(PiDConfig.from_dict(tiny_config("v1_flux"))).eval()
    net = load_weights(net, PARITY / "v1_flux" / "model_fp32.safetensors")
    fx = tiny_fixture("v1_flux")
    y, lq, sigma = fx["y"], fx["lq_latent"], fx["degrade_sigma"]

    def run(gens, idx):
        noise = draw_noise((len(idx), 3, 32, 64), gens, torch.device("cpu"))
        return sample(net, noise, y[idx], lq[idx], sigma[idx], generator=gens)

    seeds = [11, 22]
    batch = run([torch.Generator().manual_seed(s) for s in seeds], [0, 1])
    single = run([torch.Generator().manual_seed(seeds[1])], [1])
    assert torch.allclose(batch[1:], single, atol=1e-5)  # same pixels whatever the batch
    again = run([torch.Generator().manual_seed(s) for s in seeds], [0, 1])
    assert torch.equal(batch, again)
    other = run([torch.Generator().manual_seed(s + 1) for s in seeds], [0, 1])
    assert (other - batch).abs().mean() > 1e-3


def test_one_generator_draws_noise_then_eps_in_order():
    """At batch 1 a single generator gives upstream's draw order: noise, then one ε per step."""
    net = _Recorder()
    gen = torch.Generator().manual_seed(5)
    noise = draw_noise((1, 3, 4, 4), gen, torch.device("cpu"))
    out = sample(net, noise, None, None, torch.zeros(1), generator=gen)
    ref_gen = torch.Generator().manual_seed(5)
    draws = [torch.randn(1, 3, 4, 4, generator=ref_gen) for _ in range(4)]
    ref = sample(net, draws[0], None, None, torch.zeros(1), eps=draws[1:])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", ["v1_sdxl", "v15_flux2"])
def test_bf16_policy_stays_close_to_fp32_reference(variant):
    """Matmul weights in bf16, norms/gates/streams fp32 (upstream's autocast flow)."""
    net = load_weights(PiDNet(PiDConfig.from_dict(tiny_config(variant))).eval(),
                       PARITY / variant / "model_ema_bf16.pth")
    net.to_inference_dtype(torch.bfloat16)
    assert net.s_embedder.proj.weight.dtype == torch.bfloat16
    assert net.patch_blocks[0].norm_x1.weight.dtype == torch.float32
    assert net.lq_proj.gate_modules[0].log_alpha.dtype == torch.float32
    assert net.y_pos_embedding.dtype == torch.float32
    fx = tiny_fixture(variant)
    with torch.no_grad():
        out = net(fx["x"], fx["t"], fx["y"], fx["lq_latent"], fx["degrade_sigma"])
    assert out.dtype == torch.bfloat16  # the velocity comes out of a bf16 Linear, as upstream
    rel = ((out.float() - fx["out"]).norm() / fx["out"].norm()).item()
    assert 1e-5 < rel <= 2e-2, rel  # bf16 really ran (not exact), and stays within the stated bound


def test_step_predicts_x0_in_float64_then_renoises_in_float32():
    """Upstream's step arithmetic (docs/model.md#sampler): x0 = x − t·v in float64 from the float32 timestep, rounded
    to float32; re-noising (1 − t')·x0 + t'·ε in float32; the last step returns x0 itself."""
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(2, 3, 16, 16, generator=g) for _ in range(3))
    t_cur, t_next = (torch.tensor(t, dtype=torch.float32) for t in (0.866, 0.634))
    x0 = (x.double() - t_cur.double() * v.double()).float()
    assert not torch.equal(x0, x - t_cur * v)  # float32 arithmetic rounds differently: the float64 pass matters
    assert torch.equal(step(x, v, t_cur.item(), 0.0, None), x0)
    assert torch.equal(step(x, v, t_cur.item(), t_next.item(), eps), (1 - t_next) * x0 + t_next * eps)
