"""Attention heads split across devices: one image decoded on several GPUs, for latency.

Why heads: attention is most of a 4K decode's GPU time (docs/performance.md#where-the-time-goes) and its heads
are independent. Each device keeps its share of every attention's heads (the rows of the q/k/v projection that
make them) and computes everything else whole; one all-gather after each attention puts the heads back together.
Every device then holds the same tensors from the same inputs, so nothing else is exchanged. The process group and
the helper processes are `split.py`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class HeadShard:
    rank: int  # this device's place in the group: it keeps heads [rank·local, (rank+1)·local)
    world: int  # devices in the group
    group: str  # the torch.distributed process group's name


def check_divides(world: int, head_counts: Sequence[int]) -> None:
    if any(n % world for n in head_counts):
        raise ValueError(f"one image on {world} GPUs splits each attention's heads evenly across them, and this "
                         f"checkpoint's attentions have {' and '.join(map(str, sorted(set(head_counts))))} heads: "
                         f"use a number of GPUs per image that divides them")


def keep_heads(qkv: nn.Linear, heads: int, shard: HeadShard) -> None:
    """Keep the rows of a fused q/k/v projection (no bias; [3·heads·head_dim, in], q, k, v in turn) that make
    this device's heads."""
    if qkv.bias is not None:
        raise ValueError("a q/k/v projection with a bias cannot be split by heads here")
    local = heads // shard.world
    weight = qkv.weight.detach().unflatten(0, (3, heads, -1))  # [3, heads, head_dim, in]
    weight = weight[:, shard.rank * local:(shard.rank + 1) * local].flatten(0, 2).contiguous()
    qkv.weight = nn.Parameter(weight, requires_grad=False)
    qkv.out_features = weight.shape[0]


def gather_heads(out: Tensor, shard: HeadShard | None) -> Tensor:
    """[B, N, local heads·head_dim] → [B, N, heads·head_dim], the devices' heads in rank order."""
    if shard is None:
        return out
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(out.contiguous(), shard.world, shard.group)
    gathered = torch.ops._c10d_functional.wait_tensor(gathered)  # [world·B, N, local heads·head_dim]
    return gathered.unflatten(0, (shard.world, -1)).permute(1, 2, 0, 3).flatten(2)
