"""The network made ready for decoding: the speed modes and where each is applied from.

net.py is the network's arithmetic; what only changes how fast it runs (the 8-bit attention kernel, FP8 matmuls,
compilation, CUDA graphs) is switched on here, by `deploy`, which `pipeline.build_network` calls once the weights
are loaded and on their device. Each mode keeps the plain arithmetic it replaces beside it, with a test proving
them equal or within the documented error (tests/test_speed_modes.py, tests/test_graphs.py).
"""

from __future__ import annotations

import functools

import torch

from pid_cli.model import attention8, inductor, layers, linear8
from pid_cli.model.net import MMDiTBlock, PiDNet, PiTBlock

# The image-token Linears of each block that `use_fp8_matmuls` converts (see model/linear8.py).
FP8_LINEARS = {MMDiTBlock: ("attn.qkv_x", "attn.proj_x", "mlp_x.w1", "mlp_x.w3", "mlp_x.w2"),
               PiTBlock: ("compress_to_attn", "expand_from_attn", "attn.qkv", "attn.proj")}


def deploy(net: PiDNet, *, attention: str = "bf16", matmul: str = "bf16", compile: bool = False,
           cuda_graphs: bool = False) -> PiDNet:
    """Switch on the speed modes of a loaded network on its device, in the one order they allow: the attention
    mode and FP8 conversion before compiling (compiled graphs keep what they saw), CUDA graphs last."""
    set_attention(net, attention)  # "8bit": opt-in INT8/FP8 attention kernel (see kernels/attention8.py)
    if matmul == "fp8":
        use_fp8_matmuls(net)  # opt-in FP8 image-token matmuls (see model/linear8.py)
    if compile:
        compile_blocks(net)  # one compilation per output size, reused for every later image
    if cuda_graphs:
        net.use_cuda_graphs()  # each sampler step one launch, from the first decode's second step on
    return net


def compile_blocks(net: PiDNet, **options) -> PiDNet:
    """torch.compile the repeated pieces (the MMDiT blocks with the latent gates before them in four graphs:
    the first, those with and without a gate, the last; one each the chunked PiT halves and their attention,
    the pixel embedding and the final layer) and the latent branch's conv stack, run once per decode (eager,
    its GroupNorms, SiLUs, paddings and layout changes took 3× its convolutions' time); the loops between
    them stay eager. Shapes are static, so a new output size compiles once and every later image of that size
    reuses it. Row reductions up to 4096 wide are read once
    (model/inductor.py)."""
    options = {"dynamic": False, **options}
    # one entry per (device, output size, last-block flag): the default limit of 8 would
    # silently fall back to eager on a 4-GPU host decoding two sizes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 1024)
    compiled = functools.partial(inductor.compile, **options)
    for block in net.patch_blocks:
        block.forward = compiled(block.forward)
    for block in net.pixel_blocks:
        for name in ("pre", "attend", "post_inputs", "residuals"):
            setattr(block, name, compiled(getattr(block, name)))
    net.lq_proj.tokens = compiled(net.lq_proj.tokens)
    net._pixel_condition = compiled(net._pixel_condition)
    net._embed_pixels = compiled(net._embed_pixels)
    net.final_layer.forward = compiled(net.final_layer.forward)
    return net


def set_attention(net: PiDNet, mode: str) -> PiDNet:
    """Pick the attention arithmetic: "bf16" (SDPA, cuDNN first; exact in an fp32 network) or the
    opt-in "8bit" kernel (INT8 Q·K, FP8 P·V; Ada/Hopper GPUs; its speed and error per card:
    docs/performance.md#speed-modes). Set before the first decode: compiled graphs keep the mode they saw."""
    if mode not in layers.ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}: expected one of {', '.join(layers.ATTENTION_MODES)}")
    modules = [m for m in net.modules() if hasattr(m, "attention_mode")]
    if mode == "8bit":
        dims = sorted({m.head_dim for m in modules})
        if not all(attention8.supported(d) for d in dims):
            raise ValueError(f"--attention 8bit supports head dims {attention8.MIN_HEAD_DIM}.."
                             f"{attention8.MAX_HEAD_DIM}; this checkpoint has {dims}")
        net._require_8bit_tensor_cores("--attention 8bit")
        if not layers.HAS_TRITON:
            raise ValueError("--attention 8bit runs a Triton kernel, and Triton is not installed (pip install "
                             "triton)")
    for module in modules:
        module.attention_mode = mode
    return net


def use_fp8_matmuls(net: PiDNet) -> PiDNet:
    """The opt-in `--matmul fp8` mode: convert the image-token matmuls (and the PiT modulation) to FP8
    with per-channel weight and per-token activation scales. One-way (the bf16 weights are dropped);
    call after loading, before the first decode. Ada/Hopper GPUs."""
    net._require_8bit_tensor_cores("--matmul fp8")
    linear8.probe(next(net.parameters()).device)
    return convert_fp8_linears(net)


def convert_fp8_linears(net: PiDNet) -> PiDNet:
    """`use_fp8_matmuls` without its device checks (tests run the same arithmetic on a CPU)."""
    for block in [*net.patch_blocks, *net.pixel_blocks]:
        for path in FP8_LINEARS[type(block)]:
            parent, _, name = path.rpartition(".")
            owner = block.get_submodule(parent)
            setattr(owner, name, linear8.Fp8Linear(getattr(owner, name)))
    for block in net.pixel_blocks:
        block.matmul_mode = "fp8"
        block._split = None  # re-split (and quantise) on the next decode
    return net
