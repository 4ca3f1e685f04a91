"""The torch custom ops behind our kernels, `torch.ops.pid.*`: each runs its Triton kernel on CUDA, its torch
reference (reference.py) on the CPU, and has a fake (meta) implementation that gives torch.compile the output's
shape and dtype, so compiled code calls the op as one opaque node.

    pid::norm_rope      RMSNorm of q or k heads, then RoPE, rounded to attention's dtype     (norm_rope.py)
    pid::pixel_mlp_     a PiT block's per-pixel tail, written into the pixel stream xp       (pixel_mlp.py)
    pid::quantize_kv8   K and V for 8-bit attention, from their text and image parts        (kv_quant.py)
    pid::attention8     8-bit attention on the quantised K and V                            (attention8.py)

Importing this module registers them (the model's modules import it). The Triton modules are imported inside the
CUDA implementations, when one first runs: without Triton the rest still imports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pid_cli.kernels import reference
from pid_cli.kernels.constants import KEY_BLOCK, split_widths


def on_device(t: Tensor) -> torch.cuda.device:
    """The context our Triton kernels launch in. Triton launches on the current CUDA device and its current
    stream, not on the device of the tensors passed: a `pid decode` worker for cuda:1 running eager (compiled
    graphs set the device themselves) would otherwise launch on cuda:0, unordered with cuda:1's work."""
    return torch.cuda.device(t.device)


# ---------------------------------------------------------------------------------------------------------------
# pid::norm_rope


@torch.library.custom_op("pid::norm_rope", mutates_args=(), device_types="cuda")
def _norm_rope_op(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    from pid_cli.kernels import norm_rope

    with on_device(x):
        return norm_rope.launch(x, weight, eps, cos, sin, out_dtype)


@_norm_rope_op.register_kernel("cpu")
def _(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    return reference.norm_rope(x, weight, eps, cos, sin, out_dtype)


@_norm_rope_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape, dtype=out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# pid::pixel_mlp_


@torch.library.custom_op("pid::pixel_mlp_", mutates_args=("xp",), device_types="cuda")
def _pixel_mlp_op(xp: Tensor, modulation: Tensor, branch: Tensor, norm_weight: Tensor, eps: float, w1: Tensor,
                  b1: Tensor, w2: Tensor, b2: Tensor) -> None:
    """`PiTBlock.residuals` of a bf16 network, written into xp (contiguous fp32 [n, P², C])."""
    from pid_cli.kernels import pixel_mlp

    args = (modulation, branch, norm_weight, eps, w1, b1, w2, b2)
    with on_device(xp):
        if pixel_mlp.refusal(xp, modulation, branch, norm_weight, w1, b1, w2, b2) is None:
            pixel_mlp.launch(xp, *args)
        else:  # what the kernel does not take: a pixel width no released checkpoint has (the tiny test networks)
            xp.copy_(reference.pixel_mlp(xp, *args))


@_pixel_mlp_op.register_kernel("cpu")
def _(xp: Tensor, modulation: Tensor, branch: Tensor, norm_weight: Tensor, eps: float, w1: Tensor, b1: Tensor,
      w2: Tensor, b2: Tensor) -> None:
    xp.copy_(reference.pixel_mlp(xp, modulation, branch, norm_weight, eps, w1, b1, w2, b2))


@_pixel_mlp_op.register_fake
def _(xp: Tensor, modulation: Tensor, branch: Tensor, norm_weight: Tensor, eps: float, w1: Tensor, b1: Tensor,
      w2: Tensor, b2: Tensor) -> None:
    return None


# ---------------------------------------------------------------------------------------------------------------
# pid::quantize_kv8 and pid::attention8 (`--attention 8bit`)


@torch.library.custom_op("pid::quantize_kv8", mutates_args=())
def _quantize_kv8_op(k_text: Tensor, k_image: Tensor, v_text: Tensor,
                     v_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from pid_cli.kernels import kv_quant

    if not kv_quant.takes(k_text, k_image, v_text, v_image):  # strides the network never makes
        return _quantize_parts(k_text, k_image, v_text, v_image)
    with on_device(k_image):
        return kv_quant.launch(k_text, k_image, v_text, v_image)


@_quantize_kv8_op.register_kernel("cpu")
def _quantize_parts(k_text: Tensor, k_image: Tensor, v_text: Tensor,
                    v_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return reference.quantize_kv(torch.cat([k_text, k_image], 1), torch.cat([v_text, v_image], 1))


@_quantize_kv8_op.register_fake
def _(k_text: Tensor, k_image: Tensor, v_text: Tensor, v_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, n_text, heads, d = k_text.shape
    n_pad = -(-(n_text + k_image.shape[1]) // KEY_BLOCK) * KEY_BLOCK
    qk_rest, v_rest = split_widths(d)
    return (k_image.new_empty(b, heads, n_pad, 64 + qk_rest, dtype=torch.int8),
            k_image.new_empty(b, heads, n_pad // KEY_BLOCK, dtype=torch.float32),
            k_image.new_empty(b, heads, 64 + v_rest, n_pad, dtype=torch.float8_e4m3fn),
            k_image.new_empty(b, heads, d, dtype=torch.float32))


@torch.library.custom_op("pid::attention8", mutates_args=())
def _attention8_op(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    from pid_cli.kernels import attention8

    with on_device(q):
        return attention8.launch(q, k8, k_scale, v8, v_scale, n_kv)


@_attention8_op.register_kernel("cpu")
def _(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    return reference.attend_quantized(q, k8, k_scale, v8, v_scale, n_kv)  # for tests: the same arithmetic, slowly


@_attention8_op.register_fake
def _(q: Tensor, k8: Tensor, k_scale: Tensor, v8: Tensor, v_scale: Tensor, n_kv: int) -> Tensor:
    return q.new_empty(q.shape)
