"""The network made ready for decoding: the speed modes and where each is applied from.

net.py is the network's arithmetic; what only changes how fast it runs (the 8-bit attention kernel, FP8 matmuls,
the split PiT modulation, compilation, CUDA graphs) is switched on here, by `deploy`, which
`pipeline.build_network` calls once the weights are loaded and on their device. Each mode keeps the plain
arithmetic it replaces beside it, with a test proving them equal or within the documented error
(tests/test_speed_modes.py, tests/test_graphs.py).
"""

from __future__ import annotations

import copy
import functools
import itertools

import torch
from torch import nn

from pid_cli.model import attention8, heads, inductor, layers, linear8
from pid_cli.model.graphs import StepGraphs
from pid_cli.model.heads import HeadShard
from pid_cli.model.net import JointAttention, MMDiTBlock, PiDNet, PiTBlock, PixelAttention
from pid_cli.model.pixel_modulation import PixelModulation, SplitPixelModulation

# The attention arithmetic of each `--attention` mode: exact SDPA (bf16 in the bf16 network) or the 8-bit kernel.
ATTENTION = {"bf16": layers.attention, "8bit": attention8.attention}
ATTENTION_MODES = tuple(ATTENTION)

# The image-token Linears of each block that `use_fp8_matmuls` converts (see model/linear8.py); the PiT
# modulation's two halves exist once `split_pixel_modulation` has run.
FP8_LINEARS = {MMDiTBlock: ("attn.qkv_x", "attn.proj_x", "mlp_x.w1", "mlp_x.w3", "mlp_x.w2"),
               PiTBlock: ("compress_to_attn", "expand_from_attn", "attn.qkv", "attn.proj", "adaLN_modulation.pre",
                          "adaLN_modulation.post")}


def deploy(net: PiDNet, *, attention: str = "bf16", matmul: str = "bf16", compile: bool = False,
           cuda_graphs: bool = False) -> PiDNet:
    """Switch on the speed modes of a loaded network on its device, in the one order they allow: the modulation
    split and FP8 conversion before compiling (compiled graphs keep what they saw), CUDA graphs last."""
    split_pixel_modulation(net)  # always: same numbers, less memory and work per chunk of pixels
    set_attention(net, attention)  # "8bit": opt-in INT8/FP8 attention kernel (see kernels/attention8.py)
    if matmul == "fp8":
        use_fp8_matmuls(net)  # opt-in FP8 image-token matmuls (see model/linear8.py)
    if compile:
        compile_blocks(net)  # one compilation per output size, reused for every later image
    if cuda_graphs:
        use_cuda_graphs(net)  # each sampler step one launch, from the first decode's second step on
    return net


def twin(net: PiDNet) -> PiDNet:
    """A second network object sharing every parameter and buffer of `net` (no weight memory of its own), whose
    modules another arithmetic can replace (8-bit attention, FP8 matmuls, compilation) without touching `net`'s:
    the 8-bit check decodes on `net` beside its twin (pipeline.Decoder)."""
    shared = {id(t): t for t in itertools.chain(net.parameters(), net.buffers())}
    return copy.deepcopy(net, shared)


def split_pixel_modulation(net: nn.Module) -> nn.Module:
    """Replace every PiT block's `PixelModulation` by its `SplitPixelModulation` (model/pixel_modulation.py)."""
    for block in net.modules():
        if isinstance(block, PiTBlock) and isinstance(block.adaLN_modulation, PixelModulation):
            block.adaLN_modulation = SplitPixelModulation(block.adaLN_modulation)
    return net


def use_cuda_graphs(net: PiDNet) -> PiDNet:
    """Replay each sampler step on a CUDA device from a CUDA graph (model/graphs.py: one graph per output size,
    captured on the second step of its first decode); elsewhere, and where autograd records, the plain step.
    The output is bit for bit the same."""
    plain = net.velocity
    graphs = StepGraphs(plain)

    def velocity(x, t, cond):
        if x.is_cuda and not torch.is_grad_enabled():
            return graphs(x, t, cond)
        return plain(x, t, cond)

    velocity.graphs = graphs
    net.velocity = velocity
    return net


def step_graphs(net: PiDNet) -> StepGraphs | None:
    """The CUDA graphs `use_cuda_graphs` keeps for `net` (None without them)."""
    return getattr(net.velocity, "graphs", None)


def require_8bit_tensor_cores(net: nn.Module, flag: str) -> None:
    """Refuse an 8-bit mode off a GPU with 8-bit tensor cores: there it has no speed to give, only error."""
    device = next(net.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"{flag} needs an NVIDIA GPU with 8-bit tensor cores (Ada/Hopper or newer); "
                         f"this decoder is on {device}")


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


def attentions(net: nn.Module) -> list[JointAttention | PixelAttention]:
    return [m for m in net.modules() if isinstance(m, (JointAttention, PixelAttention))]


def split_heads(net: PiDNet, shard: HeadShard) -> PiDNet:
    """Keep this device's share of every attention's heads (model/heads.py: the rows of each q/k/v projection
    that make them); before the FP8 conversion. Its decodes then need the group's other devices running the same
    decode in step: each attention gathers the heads after it."""
    modules = attentions(net)
    heads.check_divides(shard.world, [m.heads for m in modules])
    for module in modules:
        for qkv in (module.qkv_x, module.qkv_y) if isinstance(module, JointAttention) else (module.qkv,):
            heads.keep_heads(qkv, module.heads, shard)
        module.heads //= shard.world
        module.shard = shard
    return net


def regroup_heads(net: PiDNet, shard: HeadShard) -> None:
    """Gather the heads through a new process group of the same devices (split.py restarts a failed one)."""
    for module in attentions(net):
        if module.shard != shard:
            module.shard = shard  # an equal shard (the usual case) keeps the compiled code's guards


def set_attention(net: nn.Module, mode: str) -> nn.Module:
    """Pick the attention arithmetic of every attention in `net` (a network or one block): "bf16" (SDPA, cuDNN
    first; exact in an fp32 network) or the opt-in "8bit" kernel (INT8 Q·K, FP8 P·V; Ada/Hopper GPUs; its speed
    and error per card: docs/performance.md#speed-modes). Set before the first decode: compiled graphs keep the
    arithmetic they saw."""
    if mode not in ATTENTION:
        raise ValueError(f"attention mode {mode!r}: expected one of {', '.join(ATTENTION_MODES)}")
    modules = attentions(net)
    if mode == "8bit":
        dims = sorted({m.head_dim for m in modules})
        if not all(attention8.supported(d) for d in dims):
            raise ValueError(f"--attention 8bit supports head dims {attention8.MIN_HEAD_DIM}.."
                             f"{attention8.MAX_HEAD_DIM}; this checkpoint has {dims}")
        require_8bit_tensor_cores(net, "--attention 8bit")
        if not layers.HAS_TRITON:
            raise ValueError("--attention 8bit runs a Triton kernel, and Triton is not installed (pip install "
                             "triton)")
    for module in modules:
        module.sdpa = ATTENTION[mode]
    return net


def use_fp8_matmuls(net: nn.Module) -> nn.Module:
    """The opt-in `--matmul fp8` mode: convert the image-token matmuls (and the PiT modulation) to FP8
    with per-channel weight and per-token activation scales. One-way (the bf16 weights are dropped);
    call after loading, before the first decode. Ada/Hopper GPUs."""
    require_8bit_tensor_cores(net, "--matmul fp8")
    linear8.probe(next(net.parameters()).device)
    return convert_fp8_linears(net)


def convert_fp8_linears(net: nn.Module) -> nn.Module:
    """`use_fp8_matmuls` without its device checks (tests run the same arithmetic on a CPU), for every block in
    `net` (a network or one block)."""
    split_pixel_modulation(net)
    for block in list(net.modules()):
        for path in FP8_LINEARS.get(type(block), ()):
            parent, _, name = path.rpartition(".")
            owner = block.get_submodule(parent)
            if not isinstance(getattr(owner, name), linear8.Fp8Linear):
                setattr(owner, name, linear8.Fp8Linear(getattr(owner, name)))
    return net
