"""PiDNet: PixelDiT (MMDiT patch blocks + per-pixel PiT blocks) with the latent branch.

Parameter names and shapes are exactly upstream's (without the `net.` prefix), so the
released `model_ema_bf16.pth` files load without conversion. The network in words: docs/model.md#the-network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pid_cli.kernels import ops as _ops  # noqa: F401  (registers torch.ops.pid.*)
from pid_cli.model import layers
from pid_cli.model.config import GATE_PER_DIM, PiDConfig
from pid_cli.model.heads import HeadShard, gather_heads
from pid_cli.model.layers import (
    GeluMLP,
    Linear,
    LinearEmbedder,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    attention,
    modulate,
    narrow_linear,
    norm_rope,
    rope_1d,
    rope_2d,
)
from pid_cli.model.lq import LQProjection, SigmaGate
from pid_cli.model.pixel_modulation import POST, PRE, PixelModulation

Rope = tuple[Tensor, Tensor] | None
Branch = tuple[Tensor, Tensor]  # (gate [B, 1, D], branch output [B, L, D]): a residual still to add
LatentInjection = tuple[SigmaGate, Tensor, Tensor]  # (gate, head features [B, L, D], σ [B])


@dataclass
class Conditioning:
    """The per-decode inputs of `PiDNet.velocity` that do not change between sampler steps."""

    text: Tensor  # [B, T, D] embedded text stream input
    lq_tokens: Tensor | None  # [B, L, lq_dim] latent-branch conv features, before the per-block heads
    sigma: Tensor  # [B] degrade_sigma
    grid: tuple[int, int]  # patch grid (H/P, W/P)
    rope_x: Rope  # image RoPE for the MMDiT blocks
    rope_y: Rope  # text RoPE
    rope_pix: Rope  # image RoPE for the PiT attention
    pos_cols: Tensor  # [W, C/2] pixel sin-cos factors
    pos_rows: Tensor  # [H, C/2]


class JointAttention(nn.Module):
    """Attention over [text; image] tokens with separate projections per stream."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.sdpa = attention  # (q, k, v) → [B, N, heads·head_dim]; inference.set_attention may swap in the 8-bit one
        self.head_dim = head_dim = dim // heads
        self.qkv_x = Linear(dim, 3 * dim, bias=False)
        self.qkv_y = Linear(dim, 3 * dim, bias=False)
        self.q_norm_x, self.k_norm_x = RMSNorm(head_dim), RMSNorm(head_dim)
        self.q_norm_y, self.k_norm_y = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj_x = Linear(dim, dim)
        self.proj_y = Linear(dim, dim)
        self.shard: HeadShard | None = None  # this device's heads when one image is split across GPUs (heads.py)

    def _qkv(self, proj: Linear, q_norm: RMSNorm, k_norm: RMSNorm, x: Tensor, rope: Rope):
        q, k, v = proj(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # each [B, N, heads, head_dim]
        return norm_rope(q_norm, q, rope, v.dtype), norm_rope(k_norm, k, rope, v.dtype), v

    def forward(self, x: Tensor, y: Tensor, rope_x: Rope, rope_y: Rope, text_out: bool) -> tuple[Tensor, Tensor | None]:
        qx, kx, vx = self._qkv(self.qkv_x, self.q_norm_x, self.k_norm_x, x, rope_x)
        qy, ky, vy = self._qkv(self.qkv_y, self.q_norm_y, self.k_norm_y, y, rope_y)
        n_txt = y.shape[1]
        if not text_out:  # only image queries are needed; text keys/values still are
            out = gather_heads(self.sdpa(qx, (ky, kx), (vy, vx)), self.shard)
            return self.proj_x(out), None
        out = self.sdpa(torch.cat([qy, qx], 1), (ky, kx), (vy, vx))
        out = gather_heads(out, self.shard)  # [B, T + L, D]
        return self.proj_x(out[:, n_txt:]), self.proj_y(out[:, :n_txt])


class MMDiTBlock(nn.Module):
    """Joint text/image block with per-stream adaLN (shift, scale, gate for attn and MLP)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm_x1, self.norm_y1 = RMSNorm(dim), RMSNorm(dim)
        self.attn = JointAttention(dim, heads)
        self.norm_x2, self.norm_y2 = RMSNorm(dim), RMSNorm(dim)
        self.mlp_x = SwiGLU(dim, mlp_hidden)
        self.mlp_y = SwiGLU(dim, mlp_hidden)
        self.adaLN_modulation_img = nn.Sequential(Linear(dim, 6 * dim))
        self.adaLN_modulation_txt = nn.Sequential(Linear(dim, 6 * dim))

    def forward(self, s: Tensor, u: Tensor, c: Tensor, rope_x: Rope, rope_y: Rope, text_out: bool = True,
                pending: Branch | None = None, lq: LatentInjection | None = None) -> tuple[Tensor, Tensor, Branch]:
        """s [B, L, D] image stream, u [B, T, D] text stream, c [B, 1, D] conditioning.

        `pending` is the previous block's gated MLP branch, not yet added to s, and `lq` the latent gate that
        comes before this block: both are applied here, so that the compiled block reads and writes the fp32
        image stream once for them and its first norm and FP8 quantisation (three passes over it before: the
        residual, the gate, the norm). For the same reason this block returns its own MLP branch unadded."""
        if pending is not None:
            s = s + pending[0] * pending[1]
        if lq is not None:
            gate, features, sigma = lq
            s = gate(s, features, sigma)
        shift_x, scale_x, gate_x, shift_mx, scale_mx, gate_mx = self.adaLN_modulation_img(c).chunk(6, dim=-1)
        shift_y, scale_y, gate_y, shift_my, scale_my, gate_my = self.adaLN_modulation_txt(c).chunk(6, dim=-1)
        attn_x, attn_y = self.attn(modulate(self.norm_x1(s), shift_x, scale_x),
                                   modulate(self.norm_y1(u), shift_y, scale_y), rope_x, rope_y, text_out)
        s = s + gate_x * attn_x
        branch = (gate_mx, self.mlp_x(modulate(self.norm_x2(s), shift_mx, scale_mx)))
        if not text_out:  # the last block's text output is never read
            return s, u, branch
        u = u + gate_y * attn_y
        u = u + gate_my * self.mlp_y(modulate(self.norm_y2(u), shift_my, scale_my))
        return s, u, branch


class PixelAttention(nn.Module):
    """Self-attention over patch tokens inside a PiT block (2D RoPE on the patch grid)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.sdpa = attention  # as JointAttention's
        self.head_dim = dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = Linear(dim, dim)
        self.shard: HeadShard | None = None  # as JointAttention's

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # each [B, L, heads, head_dim]
        q, k = norm_rope(self.q_norm, q, rope, v.dtype), norm_rope(self.k_norm, k, rope, v.dtype)
        return self.proj(gather_heads(self.sdpa(q, k, v), self.shard))


class PiTBlock(nn.Module):
    """Per-pixel block: every pixel of a patch gets its own adaLN modulation from the patch's
    conditioning vector; pixels talk across patches through one compressed token per patch.

    The per-pixel work (`pre`, `post`) is independent per patch token, so the network runs it
    over chunks of tokens; only `attend` sees all tokens at once.
    """

    def __init__(self, pixel_dim: int, cond_dim: int, patch_size: int, attn_dim: int, heads: int):
        super().__init__()
        p2 = patch_size * patch_size
        self.pixel_dim = pixel_dim
        self.compress_to_attn = Linear(p2 * pixel_dim, attn_dim)
        self.expand_from_attn = Linear(attn_dim, p2 * pixel_dim)
        self.norm1 = RMSNorm(pixel_dim)
        self.attn = PixelAttention(attn_dim, heads)
        self.norm2 = RMSNorm(pixel_dim)
        self.mlp = GeluMLP(pixel_dim, 4 * pixel_dim)
        self.adaLN_modulation = PixelModulation(cond_dim, pixel_dim, p2)  # (s_cond, PRE | POST) → [n, P², 2C | 4C]

    def pre(self, xp: Tensor, s_cond: Tensor) -> Tensor:
        # xp [n, P², C] pixels, s_cond [n, D] → compressed tokens [n, attn_dim]
        shift_a, scale_a = self.adaLN_modulation(s_cond, PRE).chunk(2, dim=-1)
        return self.compress_to_attn(modulate(self.norm1(xp), shift_a, scale_a).flatten(1))

    def attend(self, tokens: Tensor, batch: int, rope: Rope) -> Tensor:
        return self.attn(tokens.view(batch, -1, tokens.shape[-1]), rope).flatten(0, 1)  # [B·L, attn_dim]

    def post(self, xp: Tensor, s_cond: Tensor, attended: Tensor) -> Tensor:
        """xp [n, P², C] fp32 after the attention and MLP residuals. With bf16 weights on a GPU the per-pixel
        part is the `pid::pixel_mlp_` op, one Triton kernel that updates xp in place (kernels/pixel_mlp.py: 4x fewer
        bytes moved)."""
        modulation, branch = self.post_inputs(xp, s_cond, attended)  # [n, P², 4C], [n, P², C]
        if layers.triton_kernels(xp) and self.mlp.fc1.weight.dtype == torch.bfloat16:
            mlp = self.mlp
            torch.ops.pid.pixel_mlp_(xp, modulation, branch, self.norm2.weight, self.norm2.eps,
                                     mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
            return xp
        return self.residuals(xp, modulation, branch)

    def post_inputs(self, xp: Tensor, s_cond: Tensor, attended: Tensor) -> tuple[Tensor, Tensor]:
        """The per-pixel modulation after attention [n, P², 4C] and the attention branch [n, P², C]."""
        return self.adaLN_modulation(s_cond, POST), self.expand_from_attn(attended).view(xp.shape)

    def residuals(self, xp: Tensor, modulation: Tensor, branch: Tensor) -> Tensor:
        gate_a, shift_m, scale_m, gate_m = modulation.chunk(4, dim=-1)
        xp = xp + gate_a * branch
        return xp + gate_m * self.mlp(modulate(self.norm2(xp), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = Linear(dim, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return narrow_linear(self.linear, self.norm(x))  # C → 3 channels per pixel


def pixel_sincos_tables(dim: int, height: int, width: int,
                        device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Fixed 2D sin-cos embedding of full-image pixel coordinates, as its two factors:
    cols [W, dim/2] = [sin(col·ω), cos(col·ω)] and rows [H, dim/2] = [sin(row·ω), cos(row·ω)],
    ω_k = 10000^(−k/(dim/4)); a pixel's embedding is cat(cols[col], rows[row]). Computed in
    float64 as upstream does, then rounded to float32."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def table(n: int) -> Tensor:
        angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * omega  # [n, dim/4]
        return torch.cat([angles.sin(), angles.cos()], -1).float()

    return table(width), table(height)


class PiDNet(nn.Module):
    """The PiD decoder network. `forward(x, t·1000, y, lq_latent, degrade_sigma)` → velocity ε − x0.

    Its hyper-parameters are a `PiDConfig` (model/config.py; `PiDConfig.from_dict` reads a registry
    `net_config`). What only changes its speed (the 8-bit attention, FP8 matmuls, the split PiT modulation,
    compilation, CUDA graphs) model/inference.py applies to a loaded network.
    """

    def __init__(self, config: PiDConfig):
        super().__init__()
        self.config = cfg = config
        dim, p, pixel_heads = cfg.hidden_size, cfg.patch_size, cfg.attention_heads[1]
        self.patch_size = p
        self.pixel_head_dim = cfg.pixel_attn_dim // pixel_heads
        ntk = cfg.rope_mode == "ntk_aware"
        self.rope_ref_grid = (cfg.rope_ref_h // p, cfg.rope_ref_w // p) if ntk else (None, None)
        self.pixel_chunk = 8192  # patch tokens per chunk of per-pixel work (2 chunks at 2K, 8 at 4K)

        self.pixel_embedder = LinearEmbedder(cfg.in_channels, cfg.pixel_hidden_size)
        self.s_embedder = LinearEmbedder(cfg.in_channels * p**2, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LinearEmbedder(cfg.txt_embed_dim, dim, norm=True)
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.txt_max_length, dim))
        mlp_hidden = int(2 * (4 * dim) / 3)  # SwiGLU keeps the parameter count of a 4× MLP
        self.patch_blocks = nn.ModuleList(MMDiTBlock(dim, cfg.num_groups, mlp_hidden) for _ in range(cfg.patch_depth))
        self.pixel_blocks = nn.ModuleList(
            PiTBlock(cfg.pixel_hidden_size, dim, p, cfg.pixel_attn_dim, pixel_heads)
            for _ in range(cfg.pixel_depth))
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, cfg.in_channels)
        per_dim = GATE_PER_DIM[cfg.lq_gate_type]
        self.lq_proj = LQProjection(
            cfg.lq_latent_channels, cfg.lq_latent_unpatchify_factor, cfg.lq_hidden_dim, dim, cfg.lq_num_res_blocks,
            num_heads=math.ceil(cfg.patch_depth / cfg.lq_interval), gate_per_dim=per_dim,
            padding_mode=cfg.lq_conv_padding_mode, pit_head=cfg.pit_lq_inject)
        self.pit_lq_gate = SigmaGate(dim, per_dim) if cfg.pit_lq_inject else None

    @staticmethod
    def attention_heads(net_config: dict) -> tuple[int, int]:
        """(patch, pixel) attention heads of the network `net_config` builds, without building it (nor checking
        the rest of it: that is the network's build's job)."""
        heads_config = {k: net_config[k] for k in ("num_groups", "pixel_num_groups") if k in net_config}
        return PiDConfig(**heads_config).attention_heads

    def to_inference_dtype(self, dtype: torch.dtype) -> PiDNet:
        """Cast matmul/conv weights to `dtype`; keep norms, gates' log_alpha and the text
        position table in fp32 (upstream uses them in fp32 arithmetic). bf16 here reproduces
        upstream's fp32-weights-under-bf16-autocast flow, with half the weight memory. Each
        parameter is cast once, straight to its target (a bf16 file never passes through fp32)."""
        for module in self.modules():
            target = dtype if isinstance(module, (nn.Linear, nn.Conv2d)) else torch.float32
            for param in module.parameters(recurse=False):
                param.data = param.data.to(target)
        return self

    def condition(self, y: Tensor, lq_latent: Tensor | None, degrade_sigma: Tensor, height: int,
                  width: int) -> Conditioning:
        """Everything that stays fixed across sampler steps, computed once per decode: the text
        stream input, the latent branch's conv features (the costliest part of it), RoPE and
        pixel-position tables. Identical to recomputing them every step, as upstream does."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}×{width} is not a multiple of the patch size {p}")
        gh, gw = height // p, width // p
        cfg = self.config
        n_txt = min(cfg.txt_max_length, y.shape[1])
        device = y.device
        head_dim = cfg.hidden_size // cfg.num_groups
        cols, rows = pixel_sincos_tables(cfg.pixel_hidden_size, height, width, device)
        return Conditioning(
            text=self.y_embedder(y[:, :n_txt]) + self.y_pos_embedding[:, :n_txt],  # [B, T, D]
            lq_tokens=self.lq_proj.tokens(lq_latent, gh, gw) if lq_latent is not None else None,
            sigma=degrade_sigma.float(),
            grid=(gh, gw),
            rope_x=rope_2d(head_dim, gh, gw, *self.rope_ref_grid, device=device),
            rope_y=rope_1d(head_dim, n_txt, cfg.text_rope_theta, device=device) if cfg.use_text_rope else None,
            rope_pix=rope_2d(self.pixel_head_dim, gh, gw, *self.rope_ref_grid, device=device),
            pos_cols=cols, pos_rows=rows)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, lq_latent: Tensor | None, degrade_sigma: Tensor) -> Tensor:
        # x [B, 3, H, W] sample, t [B] (×1000), y [B, T, txt_dim] text, lq_latent [B, C_lat, zh, zw], σ [B]
        return self.velocity(x, t, self.condition(y, lq_latent, degrade_sigma, x.shape[2], x.shape[3]))

    def velocity(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The velocity ε − x0 for sample x [B, 3, H, W] at timesteps t [B] (already ×1000)."""
        b = x.shape[0]
        p, (gh, gw) = self.patch_size, cond.grid
        patches = x.view(b, -1, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)  # [B, L, 3·P²]
        s = self.s_embedder(patches)  # [B, L, D]
        t_emb = self.t_embedder(t)[:, None]  # [B, 1, D]
        c = F.silu(t_emb)
        u = cond.text
        heads = self.lq_proj.output_heads if cond.lq_tokens is not None else []
        last = len(self.patch_blocks) - 1
        pending = None
        for i, block in enumerate(self.patch_blocks):
            k, rem = divmod(i, self.config.lq_interval)
            lq = None
            if rem == 0 and k < len(heads):
                lq = (self.lq_proj.gate_modules[k], heads[k](cond.lq_tokens), cond.sigma)
            s, u, pending = block(s, u, c, cond.rope_x, cond.rope_y, text_out=i < last, pending=pending, lq=lq)

        s = self._pixel_condition(s, pending, t_emb, cond)
        return self._pixel_stage(x, s.reshape(b * gh * gw, -1), cond)

    def _pixel_condition(self, s: Tensor, pending: Branch, t_emb: Tensor, cond: Conditioning) -> Tensor:
        """The PiT blocks' per-token conditioning [B, L, D] from the last MMDiT block's output (its MLP
        branch still to add)."""
        s = F.silu(t_emb + (s + pending[0] * pending[1]))
        if self.pit_lq_gate is not None and cond.lq_tokens is not None:
            s = self.pit_lq_gate(s, self.lq_proj.pit_head(cond.lq_tokens), cond.sigma)
        return s

    def _pixel_stage(self, x: Tensor, s_cond: Tensor, cond: Conditioning) -> Tensor:
        """PiT blocks and the final layer, per-pixel work in chunks of `pixel_chunk` patch tokens
        (memory stays flat at 4K: the 6·C·P² modulation of all tokens never exists at once)."""
        b, _, height, width = x.shape
        p, (gh, gw) = self.patch_size, cond.grid
        n = b * gh * gw
        chunks = [slice(i, min(i + self.pixel_chunk, n)) for i in range(0, n, self.pixel_chunk)]
        rgb = x.view(b, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, p * p, 3)  # [B·L, P², 3]
        token_ids = torch.arange(n, device=x.device) % (gh * gw)  # position of each token in its image
        # the pixel stream, one tensor per chunk ([n_chunk, P², C] fp32): never concatenated, never copied back
        xp = [self._embed_pixels(rgb[sl], token_ids[sl], cond).contiguous() for sl in chunks]
        for block in self.pixel_blocks:
            tokens = torch.cat([block.pre(x, s_cond[sl]) for x, sl in zip(xp, chunks, strict=True)])  # [B·L, attn]
            attended = block.attend(tokens, b, cond.rope_pix)
            del tokens
            for i, sl in enumerate(chunks):  # each chunk replaced as it goes: one chunk more at a time, at most
                xp[i] = block.post(xp[i], s_cond[sl], attended[sl])
        out = torch.cat([self.final_layer(x) for x in xp])  # [B·L, P², 3]
        return out.view(b, gh, gw, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width)

    def _embed_pixels(self, rgb: Tensor, idx: Tensor, cond: Conditioning) -> Tensor:
        """Linear(3→C) of each pixel plus the sin-cos embedding of its full-image position.
        rgb [n, P², 3] pixels of n patch tokens whose grid positions are idx [n]."""
        p, gw = self.patch_size, cond.grid[1]
        offsets = torch.arange(p, device=rgb.device)
        rows = (idx // gw)[:, None] * p + offsets  # [n, P] pixel rows of each token
        cols = (idx % gw)[:, None] * p + offsets
        half = cond.pos_cols.shape[-1]
        pos = torch.cat([cond.pos_cols[cols][:, None].expand(-1, p, -1, -1),
                         cond.pos_rows[rows][:, :, None].expand(-1, -1, p, -1)], dim=-1)  # [n, P, P, C]
        return narrow_linear(self.pixel_embedder.proj, rgb) + pos.view(rgb.shape[0], p * p, 2 * half)

