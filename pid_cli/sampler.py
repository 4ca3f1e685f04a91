"""The distilled students' few-step SDE sampler (docs/model.md#sampler).

Each step predicts x0 from the velocity v = ε − x0 and, unless it is the last, re-noises
x0 to the next timestep with fresh Gaussian noise. Arithmetic follows upstream exactly:
x0 in float64 from the float32 timestep value, re-noising in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pid_cli.model import layers

STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
ONE_STEP_T = 1.0  # the 1-step path evaluates at t = 1.0, not 0.999 (upstream `student_timestep`)
FM_TIMESCALE = 1000.0

Generators = torch.Generator | Sequence[torch.Generator]


def schedule(steps: int, t_list: Sequence[float] = STUDENT_T_LIST) -> list[float]:
    """The timesteps for `steps` steps, subsampled from the distilled schedule as upstream does.

    Upstream picks indices round(linspace(0, n, steps+1)); past the schedule's length that
    repeats timesteps (zero-length steps that still cost a network evaluation), so we refuse.
    """
    n = len(t_list) - 1
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and {n} for this checkpoint's {n}-step distilled schedule, "
                         f"got {steps}")
    if steps == 1:
        return [ONE_STEP_T, float(t_list[-1])]
    idx = torch.linspace(0, n, steps + 1).round().long().tolist()  # round half to even, like upstream
    return [float(t_list[i]) for i in idx]


def draw_noise(shape: Sequence[int], generator: Generators | None, device: torch.device) -> Tensor:
    """Standard normal float32 noise; a sequence of generators draws one batch item each, so
    an image's noise depends only on its own generator, not on the batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=torch.float32)
                      for g in generator])


@torch.no_grad()
def sample(net: nn.Module, noise: Tensor, y: Tensor, lq_latent: Tensor, degrade_sigma: Tensor,
           t_list: Sequence[float] | None = None, eps: Sequence[Tensor] | None = None,
           generator: Generators | None = None,
           callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run the schedule `t_list` (default: the 4-step student list) from `noise` [B, 3, H, W].

    `eps` replays explicit re-noising tensors (one per intermediate step); otherwise they are
    drawn from `generator` after the caller drew `noise` from it, matching upstream's order.
    `callback(k, x)` sees the state after step k (for progress, or to inspect the trace).
    Returns x0 clamped to [-1, 1], float32 [B, 3, H, W].
    """
    ts = torch.tensor(STUDENT_T_LIST if t_list is None else t_list, dtype=torch.float32)  # float32, as upstream
    if ts.numel() < 2 or ts[-1].item() != 0.0:
        raise ValueError(f"t_list must have at least two entries and end at 0, got {ts.tolist()}")
    if eps is not None and len(eps) != ts.numel() - 2:
        raise ValueError(f"eps must hold {ts.numel() - 2} tensors (one per intermediate step), got {len(eps)}")
    batch, device = noise.shape[0], noise.device
    sigma = degrade_sigma.to(device=device, dtype=torch.float32).expand(batch)
    x = noise.float()
    if hasattr(net, "condition"):  # PiDNet: text, latent features and tables once, not once per step
        cond = net.condition(y, lq_latent, sigma, x.shape[2], x.shape[3])
        velocity = lambda x, t: net.velocity(x, t, cond)
    else:
        velocity = lambda x, t: net(x, t, y, lq_latent, sigma)
    # One copy of the schedule to the device and its values on the host: a per-step copy or .item() would
    # make the host wait for the GPU to drain before it could queue the next step.
    ts_device, t_values = ts.to(device), ts.tolist()
    for k in range(ts.numel() - 1):
        v = velocity(x, (ts_device[k] * FM_TIMESCALE).expand(batch))
        noise = None
        if t_values[k + 1] > 0:
            noise = eps[k].to(device=device, dtype=torch.float32) if eps is not None else \
                draw_noise(x.shape, generator, device)
        x = step(x, v, t_values[k], t_values[k + 1], noise)
        if callback is not None:
            callback(k, x)
    return x.clamp(-1, 1)


def step(x: Tensor, v: Tensor, t_cur: float, t_next: float, noise: Tensor | None) -> Tensor:
    """One step from x at t_cur with velocity v: x0 = x − t_cur·v in float64, rounded to float32, then
    re-noised to t_next with `noise` (float32: (1 − t_next)·x0 + t_next·noise), or x0 itself at the last
    step. t_cur and t_next are float32 values. On a GPU one Triton kernel (`kernels.sampler_step`) does it with the
    same roundings, bit for bit."""
    if layers.triton_kernels(x):
        from pid_cli.kernels import sampler_step

        with torch.cuda.device(x.device):  # Triton launches on the current device
            return sampler_step.launch(x, v, t_cur, t_next, noise)
    t_cur32, t_next32 = (torch.tensor(t, dtype=torch.float32) for t in (t_cur, t_next))
    x0 = (x.double() - t_cur32.double() * v.double()).float()
    return x0 if noise is None else (1 - t_next32) * x0 + t_next32 * noise
