"""The PiT blocks' per-pixel adaLN: one Linear(D → P²·6C) per block, in two forms with the same result.

Every pixel of a patch gets its own (shift, scale, gate) for the attention and the MLP branch, six C-wide chunks,
from the patch token's conditioning vector. The block uses the first two chunks before its attention and the other
four after it.

`PixelModulation` is the plain form: the checkpoint's Linear, computed whole, then sliced. `SplitPixelModulation`
regroups the Linear's rows into one Linear per part, so each chunk of the per-pixel work computes only the rows it
needs (at 4K the whole 6·C·P² output of every token would be ~6 GB); `model/inference.py` swaps it in once the
weights are loaded. tests/test_graphs.py holds the two equal.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pid_cli.model.layers import Linear

PRE, POST = 0, 1  # (shift, scale) before the block's attention; (gate, shift, scale, gate) after it


class PixelModulation(nn.Sequential):
    """Linear(D → P²·6C) with upstream's row order, pixel-major: row p·6C + chunk·C + channel. A Sequential, so
    that the checkpoint's `adaLN_modulation.0.*` names load as they are."""

    def __init__(self, cond_dim: int, pixel_dim: int, pixels: int):
        super().__init__(Linear(cond_dim, 6 * pixel_dim * pixels))
        self.pixel_dim = pixel_dim

    def forward(self, s_cond: Tensor, part: int) -> Tensor:
        # s_cond [n, D] → [n, P², 2C] (PRE) or [n, P², 4C] (POST)
        c = self.pixel_dim
        out = self[0](s_cond).view(s_cond.shape[0], -1, 6 * c)  # [n, P², 6C]
        return out[..., : 2 * c] if part == PRE else out[..., 2 * c:]


class SplitPixelModulation(nn.Module):
    """`PixelModulation` as two Linears, `pre` (its P²·2C rows that feed the attention) and `post` (the P²·4C
    others), each in pixel-major order. Takes over the plain form's tensors (no copy is kept)."""

    def __init__(self, plain: PixelModulation):
        super().__init__()
        linear, c = plain[0], plain.pixel_dim
        rows = torch.arange(linear.out_features, device=linear.weight.device).view(-1, 6 * c)  # [P², 6C]
        self.pixel_dim = c
        self.pre = _rows_of(linear, rows[:, : 2 * c].reshape(-1))
        self.post = _rows_of(linear, rows[:, 2 * c:].reshape(-1))

    def forward(self, s_cond: Tensor, part: int) -> Tensor:
        out = (self.pre if part == PRE else self.post)(s_cond)  # [n, P²·2C] or [n, P²·4C]
        return out.view(s_cond.shape[0], -1, (2 + 2 * part) * self.pixel_dim)


def _rows_of(linear: nn.Linear, rows: Tensor) -> Linear:
    with torch.device("meta"):
        part = Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    part.weight = nn.Parameter(linear.weight.detach()[rows], requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias.detach()[rows], requires_grad=False)
    return part
