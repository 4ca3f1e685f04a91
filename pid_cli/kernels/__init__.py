"""Our GPU kernels (Triton), their torch references and the torch custom ops that dispatch between them.

    constants.py       Triton-free numbers and layout rules the kernels share with the model code (8-bit key
                       blocks, INT8/FP8 ranges, the head dims 8-bit attention takes and how it splits them)
    reference.py       the torch ops each kernel replaces, on any device (Triton-free): the ops' CPU
                       implementations and what the kernels are held to
    ops.py             registers the `torch.ops.pid.*` custom ops: the Triton kernel on CUDA, the reference on
                       the CPU, a fake (meta) implementation for torch.compile's tracing
    attention8.py      8-bit attention (INT8 Q·K, FP8 P·V), the `--attention 8bit` mode       (Triton)
    kv_quant.py        K/V quantisation for attention8, reading the text and image parts     (Triton)
    norm_rope.py       RMSNorm of q/k heads, then RoPE, in one pass                          (Triton)
    pixel_mlp.py       the per-pixel tail of a PiT block                                     (Triton)
    sampler_step.py    one sampler step's arithmetic (called by `sampler.step`, not an op)   (Triton)

The Triton modules are imported only where a kernel launches (inside the CUDA implementations in ops.py, and
`sampler.step`), so a machine without Triton imports the rest. Nothing here imports `pid_cli.model` or any other
part of pid_cli: the model imports the kernels, never the other way round.
"""
