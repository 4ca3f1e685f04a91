"""How torch.compile builds the network's kernels: row reductions up to 4096 values wide held in registers, and
every reduction kernel's configuration picked by rule rather than by timing.

Why: Inductor keeps a row in registers (a "persistent" reduction) only up to 1024 values; a wider row is read
twice, once for its statistic and once to apply it. The network's row reductions are all wider: RMSNorm over
1536 channels and, with `--matmul fp8`, the per-token FP8 scales over 1536 and 4096 values, most of its glue.
Read once, a decode with both 8-bit modes is faster, one without them unchanged (docs/performance.md#machinery).
Inductor has no setting for the limit; its extension point is a choices handler, installed here only while our
compiled functions run (Inductor compiles in the calling thread) and only for that thread, so other compiled
code in the process keeps Inductor's defaults. A torch without that hook compiles with the defaults. Inductor's
graph cache does not see the handler: kernels an older pid cached (`<pid cache>/inductor`) stay in use until
that cache is cleared.

Why by rule: Inductor times several configurations of a reduction kernel the first time it runs and keeps the
fastest, and they sum in different orders. Two processes with cold caches (a farm's other node, a rerun after the
cache was cleared) then wrote 2K images one 8-bit level apart; in Inductor's deterministic mode, which picks by
rule, they were identical, and no slower at 2K or 4K (docs/performance.md#reproducibility). A torch without that
mode keeps the timing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

PERSISTENT_ROW_LIMIT = 4096


@functools.cache
def _wide_row_choices() -> Any:
    """A WideRowChoices instance, or None under a torch whose Inductor lacks the hook. Built on first use:
    importing Inductor's choices takes ~3 s, which an eager decode (`--compile auto` on a short run) and every
    other command would otherwise pay at start."""
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:  # a torch whose Inductor lacks the hook: its defaults
        return None
    if not hasattr(V, "set_choices_handler"):
        return None

    class WideRowChoices(InductorChoices):
        """Inductor's choices, except that a row reduction (`INNER`) of a static width up to
        PERSISTENT_ROW_LIMIT stays in registers."""

        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            width = features.reduction_numel
            if (features.get_reduction_hint() == ReductionHint.INNER and getattr(width, "is_number", False)
                    and int(width) <= PERSISTENT_ROW_LIMIT):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return WideRowChoices()


def with_wide_rows(compiled: Callable) -> Callable:
    """`compiled` (a torch.compile'd function), compiling and running under WideRowChoices."""
    choices = _wide_row_choices()
    if choices is None:
        return compiled
    from torch._inductor.virtualized import V

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        with V.set_choices_handler(choices):
            return compiled(*args, **kwargs)

    return run


def compile(fn: Callable, **options) -> Callable:
    """torch.compile(fn, **options), its reductions of rows up to PERSISTENT_ROW_LIMIT wide held in registers and
    their configurations picked by rule (Inductor's deterministic mode, where this torch has it; other backends, as
    the tests' compile counters, get `options` as given)."""
    import torch._inductor.config as inductor_config

    if options.get("backend", "inductor") == "inductor" and hasattr(inductor_config, "deterministic"):
        options["options"] = {"deterministic": True, **options.get("options", {})}
    return with_wide_rows(torch.compile(fn, **options))
