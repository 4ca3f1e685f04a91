"""Experiment: scripts/bench.py under an Inductor setting, to compare settings in separate processes.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$V python scripts/experiments/bench_inductor_variant.py $V --sizes 2048 \
        --policies ours8fp8 ours --repeat 3    # V: base, multikernel, autotune or persistN (persist4096)

base changes nothing (the compiled blocks already hold rows up to 4096 wide since pid_cli/model/inductor.py; this
script measured the choice before it); multikernel sets Inductor's `triton.multi_kernel` (a persistent and a looped
kernel per reduction, picked by timing at run time); autotune sets `max_autotune_gemm`, so Inductor times its Triton
matmul templates (FP8 `_scaled_mm` included) against cuBLAS and can fuse the norms, gates and residual adds that
follow a matmul into its epilogue (the glue is ~30% of a 2K decode with both 8-bit modes, H100 profile in
BENCHMARKS.md; compiling takes minutes); persistN holds INNER reductions up to N wide in registers in every compiled
graph of the process. (Each sampler step already replays from one CUDA graph: pid_cli/model/graphs.py.) The setting
lives in this process, so the policies run in it, one after another, as bench.py ran them before it gave each its
own process. Give each variant its own Inductor cache: the graph cache does not see a choices handler.
"""

import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import bench  # noqa: E402

from pid_cli.registry import load_registry  # noqa: E402

variant = sys.argv.pop(1)
if variant == "multikernel":
    import torch._inductor.config as inductor_config

    inductor_config.triton.multi_kernel = 1
elif variant == "autotune":
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm = True
elif variant.startswith("persist"):
    import torch._inductor.choices as choices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    limit = int(variant.removeprefix("persist"))

    class Choices(choices.InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction):
            if features.get_reduction_hint() == ReductionHint.INNER and \
                    V.graph.sizevars.statically_known_leq(features.reduction_numel, limit):
                return True
            return choices.InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    V.set_choices_handler(Choices())
elif variant != "base":
    raise SystemExit(f"unknown variant {variant!r}: base, multikernel, autotune or persistN")


def in_this_process(args, policy: str, size: int) -> dict:
    torch._dynamo.reset()  # the previous policy's compiled code would keep its network on the GPU
    torch.cuda.empty_cache()
    return bench.run(load_registry().get(args.entry), policy, size, args.batch, args.steps, args.repeat,
                     torch.device("cuda"), args.profile, args.trace)


bench.isolated = in_this_process
bench.main()
