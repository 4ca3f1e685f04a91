"""The opt-in speed modes: 8-bit attention arithmetic (its torch reference; the Triton kernel itself is
checked against it on a GPU by tests/gpu/test_kernels.py), FP8 matmuls (torch._scaled_mm, which runs on the
CPU too), `--compile auto`, and the gate that keeps compiled decodes on several GPUs away from a
compilation."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_config, tiny_flux_entry

from pid_cli import pipeline
from pid_cli.decode import DecodeJob
from pid_cli.decode.plan import COMPILE_MIN_MEGAPIXELS, Item, auto_batch_size, compile_for, plan_batches
from pid_cli.kernels import constants, reference
from pid_cli.model import PiDConfig, PiDNet, attention8, inference, layers, linear8
from pid_cli.model.inference import FP8_LINEARS
from pid_cli.model.linear8 import Fp8Linear
from pid_cli.pipeline import CompileGate
from pid_cli.registry import load_registry


def pid_like(n: int, heads: int, d: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Unit-RMS vectors per head, as PiD's q/k RMSNorm makes them."""
    x = torch.randn(2, n, heads, d, generator=gen)
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * scale


def exact(q, k, v):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("d, nq, nk", [(64, 300, 429), (72, 256, 256), (72, 100, 700)])
@pytest.mark.parametrize("logit_scale", [1.0, 3.0])
def test_8bit_reference_stays_near_exact_attention(d, nq, nk, logit_scale):
    gen = torch.Generator().manual_seed(d + nq)
    q, k = pid_like(nq, 3, d, gen, logit_scale), pid_like(nk, 3, d, gen)
    v = torch.randn(2, nk, 3, d, generator=gen)
    truth = exact(q, k, v)
    error = rel(reference.attention8(q, k, v), truth)
    bf16 = rel(exact(q.bfloat16(), k.bfloat16(), v.bfloat16()), truth)
    assert 1e-3 < error < 0.05  # quantised (not exact), within what docs/performance.md#speed-modes reports
    assert error > 3 * bf16  # the price of the mode is real and is why it is opt-in


def test_shared_key_offset_costs_no_precision():
    """Removing the per-head key mean keeps INT8's range for what varies between keys."""
    gen = torch.Generator().manual_seed(1)
    q, k = pid_like(200, 2, 64, gen, 2.0), pid_like(300, 2, 64, gen)
    v = torch.randn(2, 300, 2, 64, generator=gen)
    offset = 20 * torch.randn(64, generator=gen)  # softmax ignores it, an INT8 scale would not
    base = rel(reference.attention8(q, k, v), exact(q, k, v))
    shifted = rel(reference.attention8(q, k + offset, v), exact(q, k + offset, v))
    assert shifted < 1.2 * base


def test_quantize_kv_layout_padding_and_scales():
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 300, 2, 72, generator=gen), torch.randn(1, 300, 2, 72, generator=gen) * 5
    k8, k_scale, v8, v_scale = reference.quantize_kv(k, v)
    v8 = reference.mma_key_order(v8.float(), inverse=True).to(v8.dtype)  # keys in their natural order
    assert k8.dtype == torch.int8 and tuple(k8.shape) == (1, 2, 384, 96)  # 300 keys → 3 blocks of 128; 72 → 64 + 32
    assert v8.dtype == torch.float8_e4m3fn and tuple(v8.shape) == (1, 2, 80, 384)  # transposed; 72 + ones → 64 + 16
    assert tuple(k_scale.shape) == (1, 2, 3) and tuple(v_scale.shape) == (1, 2, 72)
    assert (k8[:, :, 300:] == 0).all() and (k8[..., 72:] == 0).all()
    assert (v8[:, :, :, 300:].float() == 0).all() and (v8[:, :, 73:].float() == 0).all()
    assert (v8[:, :, 72, :300].float() == 1).all()  # the ones channel: P·V also sums the softmax weights
    assert k8.abs().max() == 127 and v8.float().abs().max() == 448  # each scale uses the whole range
    centred = (k - k.mean(1, keepdim=True)).transpose(1, 2)  # [1, 2, 300, 72]
    blocks = (k8.float().unflatten(2, (3, 128)) * k_scale[..., None, None]).flatten(2, 3)[:, :, :300, :72]
    assert (blocks - centred).abs().max() <= k_scale.max() / 2 + 1e-6  # rounding, never clipping
    values = v8.float()[:, :, :72, :300].transpose(-1, -2) * v_scale[:, :, None, :]
    subnormal_step = v_scale[:, :, None, :] * 2**-9  # e4m3's spacing below its smallest normal, 2^-6
    error = (values - v.transpose(1, 2)).abs()
    assert (error <= v.transpose(1, 2).abs() / 16 + subnormal_step).all()  # 3-bit mantissa, round to nearest


def test_mma_key_order_keeps_every_p_value_in_the_thread_that_computed_it():
    # Hopper's layouts per row and group of 32 keys (PTX ISA, wgmma): the fp32 accumulator of Q·K gives the thread
    # of lane % 4 == c the keys 8j + 2c + b; the FP8 A operand of P·V takes from it keys 16h + 4c + e, in
    # registers of 4 consecutive keys. The relabelling must map the first set onto the second, and each
    # accumulator pair (b = 0, 1) onto neighbours within one register.
    relabelled = reference.mma_key_order(torch.arange(64)).tolist()  # position k holds the key moved there
    position = {key: k for k, key in enumerate(relabelled)}
    for group in (0, 32):
        for c in range(4):
            computed = [group + 8 * j + 2 * c + b for j in range(4) for b in range(2)]
            wanted = {group + 16 * h + 4 * c + e for h in range(2) for e in range(4)}
            assert {position[key] for key in computed} == wanted
            for pair in zip(computed[::2], computed[1::2], strict=True):
                assert position[pair[1]] == position[pair[0]] + 1 and position[pair[0]] % 2 == 0
    keys = torch.randn(2, 3, 128)
    assert torch.equal(reference.mma_key_order(reference.mma_key_order(keys), inverse=True), keys)
    assert not torch.equal(reference.mma_key_order(keys), keys)


def test_head_dim_split():
    assert constants.split_widths(64) == (0, 16)  # V gets its ones channel in a 16-wide remainder
    assert constants.split_widths(72) == (32, 16)
    assert constants.split_widths(96) == (32, 64)
    assert [d for d in range(32, 130) if attention8.supported(d)] == list(range(64, 97))


def test_set_attention_validates_mode_head_dims_and_device():
    net = PiDNet(PiDConfig.from_dict(tiny_config("v1_flux")))
    with pytest.raises(ValueError, match="expected one of bf16, 8bit"):
        inference.set_attention(net, "fp8")
    with pytest.raises(ValueError, match=r"head dims 64..96; this checkpoint has \[8\]"):
        inference.set_attention(net, "8bit")
    with torch.device("meta"):
        full = PiDNet(PiDConfig.from_dict(load_registry().get("flux2-2kto4k-v1.5").net_config))  # head dims 64 and 72
    with pytest.raises(ValueError, match=r"needs an NVIDIA GPU .* on meta"):
        inference.set_attention(full, "8bit")
    assert {m.sdpa for m in inference.attentions(full)} == {layers.attention}  # a refused switch changes nothing
    assert len(inference.attentions(full)) == 14 + 2  # every MMDiT and PiT block


# ---------------------------------------------------------------------------------------------------------
# --matmul fp8


def test_fp8_rows_use_the_whole_e4m3_range_and_survive_zero_rows():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * torch.tensor([1e-3, 1, 10, 1e3, 0])[:, None]
    x8, scale = linear8.quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and tuple(scale.shape) == (5, 1)
    assert (x8.float()[:4].abs().amax(-1) == 448).all()  # every non-zero row spans e4m3's range
    assert (x8.float()[4] == 0).all() and torch.isfinite(scale).all()
    step = scale * 2**-9  # e4m3's spacing below its smallest normal
    assert ((x8.float() * scale - x).abs() <= x.abs() / 16 + step).all()  # 3-bit mantissa, round to nearest


def test_fp8_linear_is_the_scaled_product_and_costs_a_few_percent():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(96, 256, generator=gen).bfloat16()
    w, bias = (torch.randn(80, 256, generator=gen) / 16).bfloat16(), torch.randn(80, generator=gen).bfloat16()
    weight8, w_scale, b = linear8.quantize_weight(w, bias)
    out = linear8.linear(x.view(2, 48, 256), weight8, w_scale, b)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (2, 48, 80)
    x8, x_scale = linear8.quantize_rows(x)
    dequantized = (x8.float() * x_scale) @ (weight8.float() * w_scale.T).T + bias.float()
    assert torch.allclose(out.view(96, 80).float(), dequantized, rtol=1e-2, atol=1e-2)  # bf16 rounding only
    exact = x.double() @ w.double().T + bias.double()
    error = rel(out.view(96, 80), exact)
    assert 5e-3 < error < 6e-2  # quantised (e4m3 per-row: ~3.7%), not exact; docs/performance.md#speed-modes reports it
    assert error > 5 * rel(F.linear(x, w, bias), exact)


def test_fp8_mode_converts_the_image_token_matmuls_and_nothing_else(monkeypatch):
    cfg = {**tiny_config("v15_flux2"), "hidden_size": 64, "num_groups": 2, "pixel_attn_hidden_size": 32,
           "pixel_num_groups": 2}
    torch.manual_seed(0)
    net = PiDNet(PiDConfig.from_dict(cfg)).eval()
    for name, p in net.named_parameters():  # non-zero everywhere, so every matmul reaches the output
        p.data = torch.randn_like(p) * 0.1 if "norm" not in name else torch.ones_like(p)
    net.to_inference_dtype(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    scale = cfg["sr_scale"] * cfg["latent_spatial_down_factor"] // cfg["lq_latent_unpatchify_factor"]
    x, y = torch.randn(1, 3, 32, 64, generator=gen), torch.randn(1, 12, cfg["txt_embed_dim"], generator=gen)
    lq = torch.randn(1, cfg["lq_latent_channels"], 32 // scale, 64 // scale, generator=gen)
    t, sigma = torch.tensor([0.7]), torch.tensor([0.0])
    with torch.inference_mode():
        bf16_out = net(x, t, y, lq, sigma)
    text_qkv = net.patch_blocks[0].attn.qkv_y.weight
    inference.convert_fp8_linears(net)  # use_fp8_matmuls refuses the CPU (no speed there); the arithmetic is the same
    converted = {name for name, m in net.named_modules() if isinstance(m, Fp8Linear)}
    expected = {f"patch_blocks.{i}.{path}" for i in range(cfg["patch_depth"]) for path in FP8_LINEARS[type(
        net.patch_blocks[0])]} | {f"pixel_blocks.{j}.{path}" for j in range(cfg["pixel_depth"])
                                  for path in FP8_LINEARS[type(net.pixel_blocks[0])]}
    assert converted == expected
    assert net.patch_blocks[0].attn.qkv_y.weight is text_qkv  # the text stream stays bf16
    assert not any(n.endswith("qkv_x.weight") for n, _ in net.named_parameters())  # the bf16 copies are gone
    calls = []
    fp8_linear = linear8.linear
    monkeypatch.setattr(linear8, "linear", lambda x, *a: calls.append(a[0].shape) or fp8_linear(x, *a))
    with torch.inference_mode():
        fp8_out = net(x, t, y, lq, sigma)
    pixel = cfg["pixel_hidden_size"] * cfg["patch_size"] ** 2
    assert calls.count((2 * pixel, cfg["hidden_size"])) == cfg["pixel_depth"]  # the PiT modulation, both halves
    assert calls.count((4 * pixel, cfg["hidden_size"])) == cfg["pixel_depth"]
    assert len(calls) == len(expected)  # the modulation's halves are among the converted Linears
    assert fp8_out.shape == bf16_out.shape and torch.isfinite(fp8_out).all()
    assert 1e-3 < rel(fp8_out, bf16_out.double()) < 5e-2  # moved by the rounding (1e-2 here), not broken


def test_use_fp8_matmuls_refuses_a_device_without_8bit_tensor_cores():
    net = PiDNet(PiDConfig.from_dict(tiny_config("v1_flux")))
    with pytest.raises(ValueError, match=r"--matmul fp8 needs an NVIDIA GPU .* on cpu"):
        inference.use_fp8_matmuls(net)
    assert not any(isinstance(m, Fp8Linear) for m in net.modules())  # refused: nothing converted


# ---------------------------------------------------------------------------------------------------------
# --compile auto


def job(compile: str, devices: list[str]) -> DecodeJob:
    entry = load_registry().get("flux2-2kto4k-v1.5")
    return DecodeJob(inputs=[], out=None, entry=entry, weights=None, compile=compile,
                     devices=[torch.device(d) for d in devices])


def items(n: int, hw: int) -> list[Item]:
    return [Item(None, 0, (32, hw, hw), None, 0.0, 0, "") for _ in range(n)]


def test_compile_auto_compiles_only_runs_long_enough_to_pay_it_back(monkeypatch):
    monkeypatch.setattr(layers, "HAS_TRITON", True)
    entry = load_registry().get("flux2-2kto4k-v1.5")
    scale = entry.latent.vae_factor * entry.sr_scale
    hw_2k = 2048 // scale
    per_image = 2048 * 2048 / 1e6
    enough = int(COMPILE_MIN_MEGAPIXELS / per_image) + 1
    assert compile_for(job("auto", ["cuda:0"]), items(1, hw_2k), scale) is False  # one image: first PNG in seconds
    assert compile_for(job("auto", ["cuda:0"]), items(enough, hw_2k), scale) is True
    assert compile_for(job("auto", ["cuda:0"]), items(enough // 2, hw_2k), scale) is False  # one worker's half
    assert compile_for(job("auto", ["cuda:0"]), items(enough // 4 + 1, 4 * hw_2k // 2), scale) is True  # 4K
    assert compile_for(job("on", ["cuda:0"]), items(1, hw_2k), scale) is True
    assert compile_for(job("off", ["cuda:0"]), items(10_000, hw_2k), scale) is False
    assert compile_for(job("auto", ["cpu"]), items(10_000, hw_2k), scale) is None  # the Decoder's CPU default



def test_auto_batch_fills_the_gpu_once_per_output_size_and_no_further(monkeypatch):
    """`--batch-size auto` picks per output size: 4 images at 2K (where throughput peaked), 1 at 4K, up to 16 of
    small ones; less where free memory says so; 1 on a CPU. A run of mixed sizes batches each size by its own
    rule, not by the first input's."""
    entry = load_registry().get("flux2-2kto4k-v1.5")
    scale = entry.latent.vae_factor * entry.sr_scale
    free = {"bytes": 120 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * 2**30))
    gpu = torch.device("cuda:0")

    def latent(height: int, width: int) -> tuple[int, int, int]:
        return (32, height // scale, width // scale)

    assert auto_batch_size(gpu, latent(2048, 2048), scale) == 4
    assert auto_batch_size(gpu, latent(1728, 2304), scale) == 4
    assert auto_batch_size(gpu, latent(3072, 4096), scale) == 1
    assert auto_batch_size(gpu, latent(4096, 4096), scale) == 1
    assert auto_batch_size(gpu, latent(1024, 1024), scale) == 16
    assert auto_batch_size(gpu, latent(512, 512), scale) == 16  # at most 16
    assert auto_batch_size(torch.device("cpu"), latent(512, 512), scale) == 1
    free["bytes"] = 8 * 2**30  # a smaller card, weights loaded: ~3.4 GB budgeted per 2K image, 80% of free memory
    assert auto_batch_size(gpu, latent(2048, 2048), scale) == 2
    free["bytes"] = 2 * 2**30
    assert auto_batch_size(gpu, latent(2048, 2048), scale) == 1  # never 0: out-of-memory then halves to single images

    def item(height: int, width: int) -> Item:
        return Item(None, 0, latent(height, width), None, 0.0, 0, "")

    free["bytes"] = 120 * 2**30
    mixed = [item(2048, 2048)] + [item(4096, 4096)] * 3 + [item(2048, 2048)] * 5
    batches = plan_batches(mixed, lambda shape: auto_batch_size(gpu, shape, scale), pad=False)
    assert [(len(b), b[0].shape) for b, _ in batches] == [(4, latent(2048, 2048)), (2, latent(2048, 2048)),
                                                       (1, latent(4096, 4096)), (1, latent(4096, 4096)),
                                                       (1, latent(4096, 4096))]


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_batch_padded_to_a_compiled_size_compiles_nothing_and_returns_only_its_own_images(tmp_path, monkeypatch):
    """`pad_to` runs a short batch as a batch of that many images, copies of its last one filling it: a size
    already compiled at that batch size compiles nothing more, and what comes back is the batch's own images,
    bit for bit as they came out of the full batch, wherever they were in it. Unpadded, the short batch compiles
    its own size."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()  # counts the graphs handed to the compiler, then runs them eagerly
    compile_blocks = inference.compile_blocks
    monkeypatch.setattr(inference, "compile_blocks", lambda net: compile_blocks(net, backend=counter))
    ran = []  # batch size of every sampler run
    sample = pipeline.sample
    monkeypatch.setattr(pipeline, "sample", lambda net, noise, *a, **kw: ran.append(len(noise)) or sample(
        net, noise, *a, **kw))
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [tiny_flux_entry()]}))
    entry = load_registry([reg]).get("tiny-flux")
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(4, 16, 2, 3, generator=gen), torch.randn(4, 12, 32, generator=gen)
    torch._dynamo.reset()
    dec = pipeline.Decoder(entry, entry.weights.path, compile=True)

    full = dec.decode_tensor(latents, text, seeds=[10, 11, 12, 13])
    compiled = counter.frame_count
    tail = dec.decode_tensor(latents[2:3], text[2:3], seeds=[12], pad_to=4)
    assert compiled > 0 and counter.frame_count == compiled and ran == [4, 4]
    assert tail.shape == (1, 3, 64, 96) and torch.equal(tail[0], full[2])
    pair = dec.decode_tensor(latents[:2], text[:2], degrade_sigma=[0.0, 0.0], seeds=[10, 11], pad_to=4)
    assert ran[-1] == 4 and torch.equal(pair, full[:2])

    alone = dec.decode_tensor(latents[2:3], text[2:3], seeds=[12])
    assert ran[-1] == 1 and counter.frame_count > compiled
    assert torch.allclose(alone, tail, atol=1e-4)  # the same image up to batch-size rounding (~3e-5 here)


def test_a_compiled_run_runs_every_batch_of_a_size_as_a_full_one():
    """The batch plan says how many images each batch runs as: compiled, every batch of a size as many as that
    size's batch size (a short one, last or alone, is padded); eager, each as itself."""
    def item(side: int) -> Item:
        return Item(None, 0, (16, side, side), None, 0.0, 0, "")

    mixed = [item(2)] * 5 + [item(3)] * 3 + [item(4)] * 2
    sizes = {2: 2, 3: 4, 4: 2}
    compiled = plan_batches(mixed, lambda shape: sizes[shape[1]], pad=True)
    assert [(len(b), runs_as, b[0].shape[1]) for b, runs_as in compiled] == [
        (2, 2, 2), (2, 2, 2), (1, 2, 2), (3, 4, 3), (2, 2, 4)]
    assert [b for b, _ in compiled][2][0] is mixed[4]
    eager = plan_batches(mixed, lambda shape: sizes[shape[1]], pad=False)
    assert [(len(b), runs_as) for b, runs_as in eager] == [(2, 2), (2, 2), (1, 1), (3, 3), (2, 2)]


def test_a_gpu_without_triton_decodes_eager_and_refuses_compile_on_by_name(monkeypatch):
    """Our GPU kernels and torch.compile's GPU code are Triton, which torch's Windows builds lack: there `--compile
    auto` decodes eager and `--compile on` says what is missing before any weights are read."""
    monkeypatch.setattr(layers, "HAS_TRITON", False)
    many = items(10_000, 256)
    assert compile_for(job("auto", ["cuda:0"]), many, 8) is None  # the Decoder's default: no Triton, never
    assert compile_for(job("off", ["cuda:0"]), many, 8) is False
    entry = load_registry().get("flux2-2kto4k-v1.5")
    with pytest.raises(ValueError, match=r"needs Triton.*--compile off"):
        pipeline.Decoder(entry, "/nonexistent/weights.safetensors", device="cuda:0", compile=True)

# ---------------------------------------------------------------------------------------------------------
# CompileGate


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_compiled_runs_overlap_but_never_a_compilation():
    gate, log, lock = CompileGate(), [], threading.Lock()
    active = {"run": 0, "compile": 0, "max_run": 0, "overlap": False}
    release = threading.Event()

    def section(kind: str, hold: threading.Event | None) -> None:
        with gate.compiling() if kind == "compile" else gate.running():
            with lock:
                active[kind] += 1
                active["max_run"] = max(active["max_run"], active["run"])
                active["overlap"] |= active["compile"] > 1 or bool(active["compile"] and active["run"])
                log.append(kind)
            if hold:
                hold.wait(5)
            with lock:
                active[kind] -= 1

    threads = [threading.Thread(target=section, args=("run", release)) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: gate._running == 3)  # three compiled decodes in flight, together
    threads.append(threading.Thread(target=section, args=("compile", None)))
    threads[-1].start()
    wait_until(lambda: gate._waiting == 1)  # the compilation waits for them
    threads.append(threading.Thread(target=section, args=("run", None)))  # a decode arriving now waits too
    threads[-1].start()
    time.sleep(0.05)
    assert log == ["run"] * 3
    release.set()
    for t in threads:
        t.join(5)
    assert not active["overlap"]
    assert active["max_run"] == 3
    assert log == ["run", "run", "run", "compile", "run"]  # the waiting compilation was not starved


def test_8bit_mode_runs_every_attention_of_the_network_through_the_quantised_path(monkeypatch):
    """The network plumbing of `--attention 8bit`, on the CPU (where the op runs the kernel's arithmetic in
    torch): every MMDiT and PiT attention goes through it, shapes survive, and the decode moves by what
    quantisation costs, not more."""
    cfg = {**tiny_config("v1_flux"), "hidden_size": 128, "num_groups": 2,  # head dim 64
           "pixel_attn_hidden_size": 144, "pixel_num_groups": 2}  # head dim 72
    torch.manual_seed(0)
    net = PiDNet(PiDConfig.from_dict(cfg)).eval()
    for name, p in net.named_parameters():  # non-zero everywhere, so attention reaches the output
        p.data = torch.randn_like(p) * 0.2 if "norm" not in name else torch.ones_like(p)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 3, 32, 64, generator=gen), torch.randn(1, 12, 32, generator=gen)
    lq, t, sigma = torch.randn(1, 16, 1, 2, generator=gen), torch.tensor([0.7]), torch.tensor([0.0])
    with torch.inference_mode():
        exact_out = net(x, t, y, lq, sigma)
    calls = []
    quantized = reference.attend_quantized
    monkeypatch.setattr(reference, "attend_quantized", lambda *a: calls.append(a[0].shape[-1]) or quantized(*a))
    monkeypatch.setattr(inference, "require_8bit_tensor_cores", lambda net, flag: None)  # the CPU runs the reference
    monkeypatch.setattr(layers, "HAS_TRITON", True)
    inference.set_attention(net, "8bit")
    with torch.inference_mode():
        out8 = net(x, t, y, lq, sigma)
    assert sorted(set(calls)) == [64, 72] and len(calls) == cfg["patch_depth"] + cfg["pixel_depth"]
    assert out8.shape == exact_out.shape and torch.isfinite(out8).all()
    assert 1e-4 < rel(out8, exact_out.double()) < 5e-2


def test_norm_rope_op_traces_to_what_the_torch_ops_return():
    """`layers.norm_rope` sends CUDA q/k through one custom op (a Triton kernel, checked against the torch ops
    by tests/gpu/test_kernels.py); torch.compile traces that op through its fake implementation (the meta kernel
    here), which must give the torch ops' shape and the dtype attention asks for (fp32 in the fp32 network,
    bf16 in the bf16 one) for strided views of a bf16 qkv projection. Elsewhere norm_rope is the torch ops
    themselves, rounded once to that dtype."""
    from pid_cli.model.layers import RMSNorm, apply_rope, norm_rope, rope_2d

    norm, rope = RMSNorm(72), rope_2d(72, 3, 4, None, None)
    qkv = torch.randn(2, 12, 3 * 5 * 72).bfloat16()
    k = qkv.unflatten(-1, (3, 5, 72)).unbind(2)[1]
    rotated = apply_rope(norm(k), rope)
    assert rotated.dtype == torch.float32
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(norm_rope(norm, k, rope, dtype), rotated.to(dtype))
        out = torch.ops.pid.norm_rope(k.to("meta"), norm.weight.to("meta"), norm.eps, *(r.to("meta") for r in rope),
                                      dtype)
        assert out.shape == (2, 12, 5, 72) and out.dtype == dtype


def test_compiled_blocks_hold_rows_up_to_4096_wide_in_registers_and_only_while_they_run(monkeypatch):
    """model/inductor.py: Inductor reads a row reduction wider than 1024 values twice; the network's (RMSNorm over
    1536 channels, FP8 scales over 1536 and 4096) are held in registers instead, under a choices handler that is
    installed only while a compiled block runs, so other compiled code in the process keeps Inductor's defaults.
    Every other decision is Inductor's own."""
    import sympy
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from pid_cli.model import inductor

    def features(width, hint=ReductionHint.INNER):
        return types.SimpleNamespace(reduction_numel=sympy.Integer(width), get_reduction_hint=lambda: hint)

    deferred = []
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda f, coop: deferred.append(int(f.reduction_numel)) or False))
    choices = inductor._wide_row_choices()
    wide_rows = type(choices)
    assert choices.should_use_persistent_reduction(features(1536), False)
    assert choices.should_use_persistent_reduction(features(4096), False)
    assert not choices.should_use_persistent_reduction(features(8192), False)
    assert not choices.should_use_persistent_reduction(features(2048, ReductionHint.OUTER), False)
    assert deferred == [8192, 2048]  # Inductor decides those

    def block(x):
        return type(V.choices), x + 1

    default = type(V.choices)
    assert default is not wide_rows
    seen, y = inductor.with_wide_rows(block)(1)
    assert seen is wide_rows and y == 2
    assert type(V.choices) is default


def test_compiled_blocks_pick_reduction_configurations_by_rule(monkeypatch):
    """model/inductor.py: Inductor's deterministic mode for every function pid compiles, so a decode's pixels do not
    depend on which configuration won a timing race in the process that compiled it (on an H200, two cold
    processes wrote 2K images one level apart without it, docs/performance.md#reproducibility). The caller's own
    options are kept."""
    import torch._inductor.config as inductor_config

    from pid_cli.model import inductor

    assert hasattr(inductor_config, "deterministic")  # the torch CI runs has the mode
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    inductor.compile(abs, dynamic=False)
    inductor.compile(abs, options={"max_autotune": True})
    inductor.compile(abs, backend="eager")  # Inductor's options mean nothing to another backend
    assert calls == [{"dynamic": False, "options": {"deterministic": True}},
                     {"options": {"deterministic": True, "max_autotune": True}}, {"backend": "eager"}]


def test_compiled_function_runs_in_deterministic_mode():
    """The option reaches Inductor: a function compiled through `inductor.compile` is lowered with
    `config.deterministic` on, one compiled with plain torch.compile with it off (seen from a graph pass that
    Inductor runs while it lowers)."""
    import torch._inductor.config as inductor_config

    from pid_cli.model import inductor

    seen = []

    def double(x):
        return x * 2

    def spy(graph):
        seen.append(inductor_config.deterministic)

    with inductor_config.patch(post_grad_custom_post_pass=spy, fx_graph_cache=False):
        for compiler in (inductor.compile, torch.compile):
            torch._dynamo.reset()
            assert torch.equal(compiler(double, dynamic=False)(torch.ones(3)), torch.full((3,), 2.0))
    torch._dynamo.reset()
    assert seen == [True, False]


def test_importing_the_network_leaves_inductor_choices_unloaded():
    """The choices handler is built when a block is first compiled: importing Inductor's choices takes seconds, which
    an eager decode (`--compile auto` on a short run) would otherwise pay before its first image."""
    code = "import sys, pid_cli.model, pid_cli.pipeline; print('torch._inductor.choices' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("n_in, n_out", [(3, 16), (16, 3)])
def test_narrow_linear_is_the_linear_it_replaces(n_in, n_out):
    """`layers.narrow_linear` (the 3-channel pixel embedding and output layer written elementwise, so the compiler
    can fuse them) returns what the Linear returns: the same fp32 values up to summation order, and in a bf16
    network the same bf16 values except where that order moves a sum across a rounding boundary."""
    from pid_cli.model.layers import Linear, narrow_linear

    gen = torch.Generator().manual_seed(0)
    linear = Linear(n_in, n_out)
    x = torch.randn(4, 300, n_in, generator=gen)
    assert torch.allclose(narrow_linear(linear, x), linear(x), rtol=1e-6, atol=1e-6)
    linear.bfloat16()
    ours, theirs = narrow_linear(linear, x), linear(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and ours.shape == (4, 300, n_out)
    ulp = theirs.float().abs().clamp_min(2**-60) * 2**-7
    assert ((ours.float() - theirs.float()).abs() <= ulp).all()
    assert (ours == theirs).float().mean() > 0.97


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_per_token_is_the_projection_of_the_concatenation(dtype):
    """A one-gate-per-token `SigmaGate` (v1.5) computes content_proj([s, f]) as two dot products per token, so the
    compiled gate reads s and f once; it must equal the projection of the concatenation (to summation order in
    fp32, to a bf16 step in the bf16 network). A gate per channel (v1) still projects the concatenation."""
    from pid_cli.model.lq import SigmaGate

    gen = torch.Generator().manual_seed(0)
    s, f = torch.randn(2, 50, 32, generator=gen), torch.randn(2, 50, 32, generator=gen).to(dtype)
    sigma = torch.tensor([0.0, 0.3])
    for per_dim in (False, True):
        gate = SigmaGate(32, per_dim).to(dtype)
        gate.log_alpha.data = torch.tensor(0.5)
        projected = gate.content_proj(torch.cat([s, f], -1))
        logit = gate.content_logit(s, f)
        assert logit.shape == projected.shape and logit.dtype == projected.dtype == dtype
        if per_dim or dtype == torch.float32:
            assert torch.allclose(logit.float(), projected.float(), rtol=1e-5, atol=1e-6)
        else:
            assert ((logit.float() - projected.float()).abs() <= projected.float().abs() * 2**-7 + 1e-6).all()
        expected = s + torch.sigmoid(projected - math.exp(0.5) * sigma[:, None, None]) * f
        assert torch.allclose(gate(s, f, sigma), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                              atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_pixel_mlp_op_is_opaque_to_the_compiler():
    """A PiT block's per-pixel tail runs as one custom op on CUDA (a Triton kernel, held to the torch ops of
    `PiTBlock.residuals` by tests/gpu/test_kernels.py); torch.compile sees it through its fake implementation, which
    must accept the network's shapes and return nothing (the op writes the pixel stream in place)."""
    def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    xp = meta(5, 256, 16, dtype=torch.float32)
    out = torch.ops.pid.pixel_mlp_(xp, meta(5, 256, 64), meta(5, 256, 16), meta(16, dtype=torch.float32), 1e-6,
                                   meta(64, 16), meta(64), meta(16, 64), meta(16))
    assert out is None


@pytest.mark.parametrize("n_text, n_image, d", [(5, 300, 64), (0, 333, 72), (7, 250, 96)])
def test_quantize_kv_op_reads_the_parts_as_their_concatenation(n_text, n_image, d):
    """`--attention 8bit` quantises K and V through one custom op that takes their text and image parts (on CUDA
    Triton kernels that never concatenate them, held to the torch ops by scripts/kv_quant_bench.py): on the CPU
    it is `quantize_kv` of the concatenation, and its fake implementation, which torch.compile traces, gives the
    same shapes and dtypes."""
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, n_text + n_image, 3, d, generator=gen).bfloat16() for _ in range(2))
    parts = (k[:, :n_text], k[:, n_text:], v[:, :n_text], v[:, n_text:])
    packed = torch.ops.pid.quantize_kv8(*parts)
    for got, expected in zip(packed, reference.quantize_kv(k, v), strict=True):
        assert torch.equal(got.float(), expected.float())
    fake = torch.ops.pid.quantize_kv8(*(t.to("meta") for t in parts))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in packed]
