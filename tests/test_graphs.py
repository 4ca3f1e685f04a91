"""Sampler steps from CUDA graphs (pid_cli/model/graphs.py): the bookkeeping around the graphs, on the CPU.

A CUDA graph replays the kernels it recorded on the tensors it recorded them with, so what can go wrong is ours:
an input not copied in before a replay, a new decode's conditioning left out, two output sizes sharing a graph.
Here a stand-in graph recomputes the step from the graph's own tensors on replay, as a real one does; the GPU
check that real graphs are bit-identical is `scripts/gpu_parity.py`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_fixture

from pid_cli.model import PiDConfig, PiDNet, inference
from pid_cli.model import graphs as graphs_mod
from pid_cli.sampler import sample


class ReplayFromStatics:
    """Replays by running the step on the inputs captured (the graph's own tensors)."""

    def __init__(self, step, graph):
        self.step, self.graph = step, graph

    def replay(self):
        self.graph.out.copy_(self.step(self.graph.x, self.graph.t, self.graph.cond))


def stand_in_capture(monkeypatch):
    captured = []

    def capture(self, graph):
        graph.out = self.step(graph.x, graph.t, graph.cond)  # the capture records; the output tensor is the graph's
        graph.graph = ReplayFromStatics(self.step, graph)
        captured.append(graph)

    monkeypatch.setattr(graphs_mod.StepGraphs, "_capture", capture)
    return captured


def decodes(fx, batches, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for batch in batches:
        x, y, lq = (torch.randn(batch, *fx[k].shape[1:], generator=gen)
                    for k in ("chain_x_0", "chain_y", "chain_lq_latent"))
        eps = [torch.randn(x.shape, generator=gen) for _ in range(3)]
        yield x, y, lq, torch.rand(batch, generator=gen) * 0.2, eps


def test_graphed_steps_refill_every_input_and_keep_one_graph_per_signature(monkeypatch):
    captured = stand_in_capture(monkeypatch)
    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    net.pixel_chunk = 5
    steps = graphs_mod.StepGraphs(net._velocity)
    net.velocity = lambda x, t, cond: steps(x, t, cond)  # what use_cuda_graphs does on a GPU
    plain = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    plain.load_state_dict(net.state_dict())
    plain.pixel_chunk = 5
    with torch.inference_mode():
        for x, y, lq, sigma, eps in decodes(fx, (1, 1, 2, 1)):  # new noise, text, latents, σ; a second batch size
            expected = sample(plain, x, y, lq, sigma, eps=eps)
            got = sample(net, x, y, lq, sigma, eps=eps)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert len(captured) == 2 and len(steps.graphs) == 2  # batch 1 and batch 2, each captured once


def test_graphed_output_is_a_fresh_tensor_each_step(monkeypatch):
    stand_in_capture(monkeypatch)
    def step(x, t, cond):
        return x * 2 + t.view(-1, 1)

    cond = make_cond()
    steps = graphs_mod.StepGraphs(step)
    outs = [steps(torch.full((1, 3), float(i)), torch.tensor([10.0 * i]), cond) for i in range(4)]
    assert [o[0, 0].item() for o in outs] == [0.0, 12.0, 24.0, 36.0]  # earlier outputs not overwritten by replays
    assert len({o.data_ptr() for o in outs}) == 4


def test_signature_tells_shapes_dtypes_and_inference_mode_apart():
    cond = make_cond()
    x, t = torch.zeros(1, 3), torch.zeros(1)
    base = graphs_mod.signature(x, t, cond)
    assert graphs_mod.signature(torch.ones(1, 3), torch.ones(1), make_cond()) == base  # values don't matter
    assert graphs_mod.signature(torch.zeros(2, 3), t, cond) != base
    assert graphs_mod.signature(x.double(), t, cond) != base
    with torch.inference_mode():
        assert graphs_mod.signature(x, t, cond) != base


def make_cond():
    from dataclasses import dataclass

    @dataclass
    class Cond:
        table: torch.Tensor
        pair: tuple[torch.Tensor, torch.Tensor] | None
        grid: tuple[int, int]

    return Cond(torch.zeros(4), (torch.zeros(2), torch.ones(2)), (1, 1))


def test_pit_modulation_split_is_made_again_only_when_the_weights_change():
    """A graph replays the split modulation weights it was captured with, so every decode's `condition` must
    hand the blocks the same tensors; new weights (loaded in place, cast) must still be split anew."""
    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    block = net.pixel_blocks[0]
    args = (fx["y"], fx["lq_latent"], fx["degrade_sigma"], *fx["x"].shape[2:])
    with torch.no_grad():
        net.condition(*args)
        first = block._split[1][0]
        net.condition(*args)
        assert block._split[1][0] is first
        block.adaLN_modulation[0].weight.add_(1.0)  # in place, as load_state_dict writes
        net.condition(*args)
        assert block._split[1][0] is not first
        torch.testing.assert_close(block._split[1][0], first + 1.0)
        net.to_inference_dtype(torch.bfloat16)
        net.condition(*args)
        assert block._split[1][0].dtype == torch.bfloat16


def test_the_whole_network_traces_as_one_graph_once_the_split_exists():
    """scripts/bench.py's upstream-compiled policy compiles the whole forward, `condition` included, as upstream's
    `--compile` does. The split's data-pointer check broke that graph in two, and on an H200 Inductor then
    failed on the second part (torch 2.11: 'SymFloat' object has no attribute 'size')."""
    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    for block in net.pixel_blocks:
        block.split_modulation()
    t = torch.full((fx["x"].shape[0],), 999.0)
    with torch.no_grad():
        explained = torch._dynamo.explain(net)(fx["x"], t, fx["y"], fx["lq_latent"], fx["degrade_sigma"])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_only_the_most_recently_used_signatures_are_kept(monkeypatch):
    captured = stand_in_capture(monkeypatch)
    steps = graphs_mod.StepGraphs(lambda x, t, cond: x + t.view(-1, 1), keep=2)
    cond = make_cond()
    t = torch.zeros(1)
    for width in (3, 3, 4, 4, 3, 5, 5):  # sizes 3, 4, back to 3 (still held), then 5 pushes out 4
        out = steps(torch.ones(1, width), t, cond)
        assert out.shape == (1, width)
    assert [key[0][0] for key in steps.graphs] == [(1, 3), (1, 5)]
    assert len(captured) == 3  # 3 and 4 captured once each, 5 once; 3 was never captured again


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_compiled_blocks_compile_once_per_output_size_never_per_image():
    """Time to first image stays the first image's: a decode compiles what its output size needs once, and every
    later image of that size (new noise, text, latent, σ, seed) runs what was compiled. A second size compiles its
    own copy of each graph once, and returning to the first compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    fx = tiny_fixture("v15_flux2")
    net = PiDNet(PiDConfig.from_dict(tiny_config("v15_flux2"))).eval()
    counter = CompileCounter()  # counts the graphs Dynamo hands to the compiler, then runs them eagerly
    inference.compile_blocks(net, backend=counter)
    compiled_after = []

    def decode(width: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, 3, 64, 64 * width, generator=gen)
        latent = torch.randn(1, 128, 1, width, generator=gen)
        text = torch.randn(fx["chain_y"].shape, generator=gen)
        sample(net, noise, text, latent, torch.rand(1, generator=gen) * 0.2, generator=gen)
        compiled_after.append(counter.frame_count)

    torch._dynamo.reset()
    with torch.inference_mode():
        for width, seed in ((1, 0), (1, 1), (1, 2), (2, 3), (2, 4), (1, 5)):
            decode(width, seed)
    first = compiled_after[0]
    assert first > 0
    assert compiled_after == [first] * 3 + [2 * first] * 3
