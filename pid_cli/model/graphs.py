"""A sampler step replayed from one CUDA graph.

Why: a 2K decode is ~2,600 kernel launches. Between two kernels the GPU idles ~2 µs while the next one is
queued, and at a few points (the latent gates, the start of the per-pixel stage) the host falls behind the GPU
outright (traces and timings: docs/performance.md#machinery). A CUDA graph of the whole velocity evaluation
is one launch. Shapes are static per output size, so one graph per input signature serves every step of every
later decode of that size; the step's inputs are copied into the graph's own tensors before each replay.

The first call of a signature runs the step eagerly on those tensors (it compiles, and Triton builds its
kernels: nothing may compile inside a capture); the second captures the graph, and every call from then on
replays it. The graphs of one network share one memory pool: only one of them runs at a time, and each
output is copied out before the next replay.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Step = Callable[[Tensor, Tensor, Any], Tensor]  # (x, t, conditioning) → velocity


def _map(fn: Callable[[Tensor], Any], value: Any) -> Any:
    """fn applied to a Conditioning field's tensors (the field, or in a tuple); other values as they are."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map(fn, v) for v in value)
    return value


def _fields(cond: Any) -> list[Any]:
    return [getattr(cond, f.name) for f in dataclasses.fields(cond)]


def signature(x: Tensor, t: Tensor, cond: Any) -> tuple:
    """What a captured graph is specific to: every input's shape, dtype and device, the conditioning's other
    (non-tensor) fields, and inference mode (tensors made inside it cannot be updated outside it)."""
    def describe(tensor: Tensor) -> tuple:
        return tuple(tensor.shape), tensor.dtype, tensor.device

    return (describe(x), describe(t), tuple(_map(describe, v) for v in _fields(cond)),
            torch.is_inference_mode_enabled())


def _tensors(cond: Any) -> list[Tensor]:
    found: list[Tensor] = []
    for value in _fields(cond):
        _map(found.append, value)
    return found


def _clone(tensor: Tensor) -> Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


class _Graph:
    """One signature's graph: its input tensors, and once captured, the graph and its output tensor."""

    def __init__(self, x: Tensor, t: Tensor, cond: Any):
        self.x, self.t = _clone(x), _clone(t)
        self.cond = dataclasses.replace(cond, **{f.name: _map(_clone, getattr(cond, f.name))
                                                 for f in dataclasses.fields(cond)})
        self.source = weakref.ref(cond)  # the conditioning now in self.cond (a decode's cond lives its steps)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def load(self, x: Tensor, t: Tensor, cond: Any) -> None:
        self.x.copy_(x)
        self.t.copy_(t)
        if self.source() is not cond:  # a new decode: its text, latent features and tables
            for static, value in zip(_tensors(self.cond), _tensors(cond), strict=True):
                static.copy_(value)
            self.source = weakref.ref(cond)


class StepGraphs:
    """`step(x, t, cond)` on a CUDA device, from the second call of each input signature on replayed from a
    CUDA graph. Returns a fresh tensor every call, as `step` does.

    At most `keep` signatures are held (the least recently used goes first): a farm job over latents of many
    sizes would otherwise keep every size's input copies (~0.3 GB at 4K) for the life of the process. Calls
    from several threads take turns: each fills the graph's inputs and queues its replay and copy-out before
    the next may touch them (on one stream, the GPU then runs them in that order too)."""

    def __init__(self, step: Step, keep: int = 4):
        self.step = step
        self.keep = keep
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pools: dict[torch.device, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        with self._lock:
            return self._call(x, t, cond)

    def _call(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        key = signature(x, t, cond)
        graph = self.graphs.get(key)
        if graph is None:  # first call: run on the graph's own inputs, so that capturing later compiles nothing
            graph = self.graphs[key] = _Graph(x, t, cond)
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
            return self.step(graph.x, graph.t, graph.cond)
        self.graphs.move_to_end(key)
        graph.load(x, t, cond)
        if graph.graph is None:
            self._capture(graph)
        graph.graph.replay()
        return graph.out.clone()

    def _capture(self, graph: _Graph) -> None:
        device = graph.x.device
        torch.cuda.empty_cache()  # the graph's pool takes what the first, uncaptured step left cached, not more
        if device not in self.pools:
            self.pools[device] = torch.cuda.graph_pool_handle()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(cuda_graph, pool=self.pools[device],
                                                         capture_error_mode="thread_local"):
            # thread_local: another thread (the pipeline's host copies, another GPU's decoder) may use CUDA meanwhile
            graph.out = self.step(graph.x, graph.t, graph.cond)
        graph.graph = cuda_graph
