"""`PiDConfig`: the network's hyper-parameters, one field each, under upstream's names.

The released configurations are data (`net_config` in registry.yaml), copied verbatim from upstream's resolved
configs: `PiDConfig.from_dict` reads one, drops the fields that only matter for training and refuses any other
key, so a typo in a user registry is named rather than silently ignored. The defaults are the released 2K
networks' (flux-2k), which every release shares except for the latent it reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Upstream config fields that only matter for training; accepted and ignored.
TRAINING_ONLY = frozenset({
    "repa_encoder_index", "train_lq_proj_only", "zero_init_lq", "num_text_blocks", "lq_aux_rgb_head",
    "lq_aux_rgb_head_latent_block_idx", "enable_ed", "ed_compress_ratio", "ed_depth_per_stage", "ed_window_size",
    "ed_num_heads", "ed_hidden_size", "ed_use_token_shuffle"})

# lq_gate_type → whether the latent gate has one value per channel (True) or one per token (False)
GATE_PER_DIM = {"sigma_aware_per_token_per_dim": True, "sigma_aware_per_token": False}


@dataclass(frozen=True)
class PiDConfig:
    """Inputs and outputs: RGB pixels cut into patch_size² patches; text embeddings of txt_embed_dim, at most
    txt_max_length tokens of them (a learned position table of that length)."""
    in_channels: int = 3
    patch_size: int = 16
    txt_embed_dim: int = 2304
    txt_max_length: int = 300

    """Patch transformer: patch_depth joint text/image MMDiT blocks of width hidden_size, num_groups heads."""
    hidden_size: int = 1536
    num_groups: int = 24
    patch_depth: int = 14

    """Pixel transformer: pixel_depth PiT blocks, pixel_hidden_size channels per pixel; their attention over
    compressed patch tokens is pixel_attn_hidden_size wide with pixel_num_groups heads (None: as the patch
    transformer's hidden_size / num_groups)."""
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int | None = 1152
    pixel_num_groups: int | None = 16
    pixel_depth: int = 2

    """Positions: RoPE on text tokens (use_text_rope, text_rope_theta) and on the patch grid; "ntk_aware" scales
    the grid's frequencies to the reference size rope_ref_h × rope_ref_w pixels, "original" does not."""
    use_text_rope: bool = True
    text_rope_theta: float = 10000.0
    rope_mode: str = "ntk_aware"
    rope_ref_h: int = 1024
    rope_ref_w: int = 1024

    """Latent branch: a conv stack over the VAE latent (lq_latent_channels, unpatchified by
    lq_latent_unpatchify_factor) of lq_hidden_dim channels and lq_num_res_blocks residual blocks, whose features
    are gated into the image stream before every lq_interval-th MMDiT block (and, with pit_lq_inject, into the
    PiT conditioning). lq_gate_type picks per-channel or per-token gates; lq_inject_mode and lq_in_channels
    admit only the released values."""
    lq_inject_mode: str = "controlnet"
    lq_in_channels: int = 0
    lq_latent_channels: int = 16
    lq_hidden_dim: int = 512
    lq_num_res_blocks: int = 4
    lq_latent_unpatchify_factor: int = 1
    lq_conv_padding_mode: str = "zeros"
    lq_gate_type: str = "sigma_aware_per_token_per_dim"
    lq_interval: int = 2
    pit_lq_inject: bool = False

    """Scale: output pixels per VAE-input pixel (sr_scale) and VAE-input pixels per latent cell."""
    sr_scale: int = 4
    latent_spatial_down_factor: int = 8

    def __post_init__(self) -> None:
        if self.rope_mode not in ("ntk_aware", "original"):
            raise ValueError(f"rope_mode must be 'ntk_aware' or 'original', got {self.rope_mode!r}")
        if self.lq_inject_mode != "controlnet":
            raise ValueError("lq_inject_mode must be 'controlnet' (the only released mode), "
                             f"got {self.lq_inject_mode!r}")
        if self.lq_in_channels:
            raise ValueError("lq_in_channels > 0 (an LQ RGB image branch) is not used by any released checkpoint "
                             "and is not supported")
        if self.lq_gate_type not in GATE_PER_DIM:
            raise ValueError(f"lq_gate_type must be one of {sorted(GATE_PER_DIM)}, got {self.lq_gate_type!r}")
        if self.lq_conv_padding_mode not in ("zeros", "replicate"):
            raise ValueError(f"lq_conv_padding_mode must be 'zeros' or 'replicate', got {self.lq_conv_padding_mode!r}")
        if self.pixel_hidden_size % 4:
            raise ValueError("pixel_hidden_size must be a multiple of 4 (2D sin-cos embedding), "
                             f"got {self.pixel_hidden_size}")
        if self.pixel_depth <= 0:
            raise ValueError("pixel_depth must be > 0")
        ratio = self.sr_scale * self.latent_spatial_down_factor / self.lq_latent_unpatchify_factor / self.patch_size
        if ratio <= 1:
            raise ValueError(f"latent→patch-grid ratio {ratio:g} ≤ 1 (sr_scale·latent_spatial_down_factor/"
                             "unpatchify/patch_size) is not a released configuration and is not supported")

    @classmethod
    def from_dict(cls, net_config: dict[str, Any]) -> PiDConfig:
        """The config of a registry `net_config` (upstream's field names). Training-only fields are dropped,
        enable_ed=True (a training experiment no release uses) is refused, and so is any other key: a TypeError
        naming them, as a wrong keyword argument would be."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(net_config) - names - TRAINING_ONLY)
        if unknown:
            raise TypeError(f"unknown configuration field(s): {', '.join(unknown)} (neither a PiDConfig field, "
                            "pid_cli/model/config.py, nor one of upstream's training-only fields)")
        if net_config.get("enable_ed"):
            raise ValueError("enable_ed=True (encoder-decoder token compression) is a training experiment that no "
                             "released checkpoint uses; pid does not implement it")
        return cls(**{key: value for key, value in net_config.items() if key in names})

    @property
    def attention_heads(self) -> tuple[int, int]:
        """(patch, pixel) attention heads: what one image split across GPUs must divide."""
        return self.num_groups, self.pixel_num_groups or self.num_groups

    @property
    def pixel_attn_dim(self) -> int:
        return self.pixel_attn_hidden_size or self.hidden_size
