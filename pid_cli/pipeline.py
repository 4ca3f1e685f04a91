"""`Decoder`: a PiD checkpoint loaded once, decoding batches of latents to pixels.

This is the library API and what every `pid decode` worker runs. Latent conversion lives in
`inputs/latent_files.py`, prompts in `text.py`, files on disk in `decode/`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pid_cli import paths
from pid_cli.devices import resolve_device
from pid_cli.inputs.latent_files import to_training_frame
from pid_cli.model import PiDConfig, PiDNet, inference, layers, load_weights
from pid_cli.model.heads import HeadShard
from pid_cli.model.layers import fast_attention
from pid_cli.model.linear8 import MATMUL_MODES
from pid_cli.outputs import level_difference, to_uint
from pid_cli.registry import Entry
from pid_cli.sampler import draw_noise, sample, schedule
from pid_cli.split import DecodeInputs, HelperGroup, check_split

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHECK_PSNR_DB = 40.0  # default threshold of the 8-bit check (docs/performance.md#8-bit-accuracy says why)


def persist_compile_caches() -> None:
    """Keep torch.compile's kernel cache beside pid's own (`<pid cache>/inductor`) rather than in /tmp,
    which render-farm jobs often get fresh: with the cache, compiling an output size takes ~15-20 s instead
    of a cold compilation. A TORCHINDUCTOR_CACHE_DIR the user set wins."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(paths.cache_dir() / "inductor"))


class CompileGate:
    """Lets compiled decodes of several `Decoder`s in threads of one process (a library user's GPU per
    thread; `pid decode` itself runs a process per GPU) run concurrently, but never beside a compilation.

    Dynamo's tracing state is process-global: a thread that calls compiled code while another thread
    traces fails ("Detected that you are using FX to symbolically trace a dynamo-optimized function"),
    which a 4-GPU run hit. The first decode of each shape on each device compiles and takes the gate
    alone; later decodes share it. A waiting compilation goes first, so it is never starved.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._compiling = False
        self._waiting = 0  # compilations queued

    @contextlib.contextmanager
    def compiling(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._compiling and self._running == 0)
            self._waiting -= 1
            self._compiling = True
        try:
            yield
        finally:
            with self._cond:
                self._compiling = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def running(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._compiling and self._waiting == 0)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()


_GATE = CompileGate()


def load_network(net_config: dict, weights: str, device: torch.device, shard: HeadShard | None = None, *,
                 dtype: str) -> PiDNet:
    """The checkpoint's network on `device` in `dtype` (a torch dtype's name), its plain arithmetic; with `shard`,
    holding only that device's attention heads (one image split across GPUs, split.py)."""
    with torch.device("meta"):
        net = PiDNet(PiDConfig.from_dict(net_config))
    load_weights(net, weights)  # adopts the file's tensors: no random init, no second copy
    net = net.to_inference_dtype(getattr(torch, dtype))
    if shard is not None:
        inference.split_heads(net, shard)  # before the move: the other devices' rows never reach this one
    return net.to(device).eval().requires_grad_(False)


def build_network(net_config: dict, weights: str, device: torch.device, shard: HeadShard | None = None, *,
                  dtype: str, attention: str, matmul: str, compile: bool) -> PiDNet:
    """`load_network`, then deployed in the given arithmetic, compiled or not (model/inference.py). Plain
    arguments: split.py hands them to its helper processes as JSON."""
    check_matmul(matmul)
    net = load_network(net_config, weights, device, shard, dtype=dtype)
    if compile:
        persist_compile_caches()
    return inference.deploy(net, attention=attention, matmul=matmul, compile=compile,
                            cuda_graphs=device.type == "cuda" and shard is None)


def check_matmul(matmul: str) -> None:
    if matmul not in MATMUL_MODES:
        raise ValueError(f"matmul mode {matmul!r}: expected one of {', '.join(MATMUL_MODES)}")


@dataclass(frozen=True)
class ExactCheck:
    """An 8-bit decode held against the exact path: the first image of an output size decoded both ways, compared
    in 8-bit levels. Below `threshold_db` the decoder falls back to the exact path for that size."""

    psnr_db: float  # inf when the two images are identical
    max_delta: int  # largest difference in 8-bit levels
    threshold_db: float

    @property
    def passed(self) -> bool:
        return self.psnr_db >= self.threshold_db

    def describe(self) -> str:
        psnr = "identical" if math.isinf(self.psnr_db) else f"PSNR {self.psnr_db:.1f} dB"
        verdict = "ok" if self.passed else f"below {self.threshold_db:g} dB: exact path from here on for this size"
        return f"{psnr}, max {self.max_delta} levels against the exact path ({verdict})"

    def record(self) -> dict:
        """JSON-ready (no Infinity: identical images have psnr_db null and max_delta 0)."""
        finite = not math.isinf(self.psnr_db)
        return {"psnr_db": round(self.psnr_db, 2) if finite else None, "max_delta": self.max_delta,
                "threshold_db": self.threshold_db, "fallback": not self.passed}


def compare_levels(image: Tensor, exact: Tensor, threshold_db: float) -> ExactCheck:
    """Two decodes [3, H, W] in [-1, 1] compared as the 8-bit PNG levels they would be written as."""
    psnr, delta = level_difference(*(to_uint(x[None], 8)[0] for x in (image, exact)))  # [H, W, 3] levels
    return ExactCheck(psnr, int(delta.max()), threshold_db)


class Decoder:
    """One PiD checkpoint on one device, or one image split across several (`helper_devices`).

    >>> dec = Decoder.from_registry("flux2", target="4k")          # doctest: +SKIP
    >>> images = dec.decode(latents, prompts=["a red fox"], seed=0)  # [B, H, W, 3] uint8

    With `helper_devices`, every attention's heads are spread over `device` and them (one helper process each,
    split.py): each image takes less time, at the cost of the GPUs' total throughput (the rest of the network
    runs on each of them, and the step is not replayed from a CUDA graph). `close()`, or leaving the decoder's
    `with` block, stops the helpers (the end of the process does too).

    With an 8-bit mode (`attention="8bit"`, `matmul="fp8"`), the first image of each output size is decoded a
    second time on the exact path (an eager network sharing the weights; the bf16 copies of the FP8-converted
    weights are kept for it) and compared in 8-bit levels: `checks` holds the result per size, `last_check`
    that of the latest `decode_tensor` call (None when it checked nothing). Below `check_psnr` dB that size
    decodes on the exact path from then on, the failing batch included. `check_psnr=None` turns the check off;
    a split decoder (`helper_devices`) does not check.
    """

    def __init__(self, entry: Entry, weights: str | Path, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, text_encoder: str | Path | None = None,
                 compile: bool | None = None, attention: str = "bf16", matmul: str = "bf16",
                 helper_devices: Sequence[str | torch.device] = (), check_psnr: float | None = CHECK_PSNR_DB):
        self.entry = entry
        self.weights = Path(weights)
        self.device = resolve_device(device)
        if compile and self.device.type == "cuda" and not layers.HAS_TRITON:
            raise ValueError("compiling for a GPU needs Triton, which is not installed (pip install triton); "
                             "without it, decode with --compile off")
        if dtype is None:  # bf16 matmuls on GPUs (upstream's autocast policy); exact fp32 on CPUs
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.text_encoder = text_encoder
        self.compiled = compile if compile is not None else self.device.type == "cuda" and layers.HAS_TRITON
        build = functools.partial(build_network, entry.net_config, str(self.weights),
                                  dtype=str(self.dtype).removeprefix("torch."), attention=attention, matmul=matmul,
                                  compile=self.compiled)
        self._helpers: HelperGroup | None = None
        self.exact_net: PiDNet | None = None  # the 8-bit check's exact path
        self.check_psnr = check_psnr if (attention, matmul) != ("bf16", "bf16") and not helper_devices else None
        self.checks: dict[tuple[int, int], ExactCheck] = {}
        self.last_check: ExactCheck | None = None
        if helper_devices:
            devices = [self.device, *(resolve_device(d) for d in helper_devices)]
            check_split(devices, entry.net_config)
            self._helpers = HelperGroup(devices, build)
        try:  # a group that fails to form, or a network that fails to build, leaves no helper behind
            if self.check_psnr is None:
                self.net = build(self.device, self._helpers.start() if self._helpers else None)
            else:
                self.net, self.exact_net = self._build_checked(attention, matmul)
        except BaseException:
            self.close()
            raise
        self._warm_shapes: set[tuple[int, ...]] = set()

    def _build_checked(self, attention: str, matmul: str) -> tuple[PiDNet, PiDNet]:
        """(the 8-bit network, the exact one): one set of weights, two sets of modules (inference.twin)."""
        check_matmul(matmul)
        exact = inference.deploy(load_network(self.entry.net_config, str(self.weights), self.device,
                                              dtype=str(self.dtype).removeprefix("torch.")))
        if self.compiled:
            persist_compile_caches()
        net = inference.deploy(inference.twin(exact), attention=attention, matmul=matmul, compile=self.compiled,
                               cuda_graphs=self.device.type == "cuda")
        return net, exact

    def runtime(self, size: tuple[int, int] | None = None) -> str:
        """What a decode's exact pixels depend on besides its inputs and settings: the torch, the GPU model, the
        weights' dtype and whether the network is compiled (eager and compiled code round differently; compiled
        pixels repeat across processes, inductor.py); for an output `size` the 8-bit check sent to the exact path,
        eager. `pid decode` writes it, with the batch size, into each PNG."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        split = f" x{len(self._helpers.devices)}" if self._helpers else ""
        check = self.checks.get(size)
        compiled = self.compiled and (check is None or check.passed)
        return (f"torch {torch.__version__}, {name}{split}, {str(self.dtype).removeprefix('torch.')}, "
                f"{'compiled' if compiled else 'eager'}")

    def close(self) -> None:
        """Stop the helper processes of a split decoder (nothing to do otherwise)."""
        if self._helpers is not None:
            self._helpers.close()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_registry(cls, backbone: str, variant: str | None = None, target: str | None = None, *,
                      registry_files: Sequence[str | Path] = (), device: str | torch.device | None = None,
                      dtype: str | torch.dtype | None = None, attention: str = "bf16", matmul: str = "bf16",
                      helper_devices: Sequence[str | torch.device] = (), download: bool = True) -> Decoder:
        """Resolve the checkpoint in the registry, fetch what is missing (unless offline), load."""
        from pid_cli import hub
        from pid_cli.registry import load_registry

        entry = load_registry(registry_files).resolve(backbone, variant, target)
        files = hub.ensure_files(entry, vae=False, text_encoder=False, download=download)
        return cls(entry, files.weights, device=device, dtype=dtype, attention=attention, matmul=matmul,
                   helper_devices=helper_devices)

    @property
    def scale(self) -> int:
        """Output pixels per latent cell."""
        return self.entry.latent.vae_factor * self.entry.sr_scale

    def output_size(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        return latent_hw[0] * self.scale, latent_hw[1] * self.scale

    def embed(self, prompts: Sequence[str], prompt_embeds: str | Path | None = None) -> Tensor:
        """Text conditioning [B, 300, 2304] for `prompts` (cache / exported file / Gemma)."""
        from pid_cli.text import embed_prompts

        return embed_prompts(list(prompts), prompt_embeds=prompt_embeds, text_encoder=self.text_encoder,
                             device=self.device, model_max_length=self.entry.net_config["txt_max_length"])

    @torch.inference_mode()
    def decode_tensor(self, latents: Tensor, text: Tensor, degrade_sigma: float | Sequence[float] = 0.0,
                      seeds: int | Sequence[int] = 0, steps: int = 4, pad_to: int | None = None) -> Tensor:
        """Latents [B, C, h, w] (normalised) + text [B, T, D] → images [B, 3, H, W] in [-1, 1].

        Each item draws its noise from its own generator seeded `seeds[i]` (an int gives
        seed + i), so an image never depends on what else is in the batch; at batch 1 the
        draws are upstream's (noise, then one ε per step) for the same seed.

        `pad_to` > B runs the batch as one of `pad_to` images, copies of the last filling it
        (dropped after). Why: compiled code and CUDA graphs are per shape, so `pid decode` runs
        a short batch as a full one rather than compile again (decode/plan.py: plan_batches).
        """
        b, _, h, w = latents.shape
        seed_list = [seeds + i for i in range(b)] if isinstance(seeds, int) else list(seeds)
        sigmas = [float(degrade_sigma)] * b if isinstance(degrade_sigma, (int, float)) else list(degrade_sigma)
        if len(seed_list) != b or len(sigmas) != b or text.shape[0] != b:
            raise ValueError(f"batch of {b} latents needs {b} seeds, sigmas and text rows "
                             f"(got {len(seed_list)}, {len(sigmas)}, {text.shape[0]})")
        if pad_to is not None and pad_to > b:  # copies of the last image
            latents, text = (torch.cat([x, x[-1:].expand(pad_to - b, *x.shape[1:])]) for x in (latents, text))
            seed_list, sigmas = seed_list + seed_list[-1:] * (pad_to - b), sigmas + sigmas[-1:] * (pad_to - b)
        dev = self.device
        lq = latents.to(torch.bfloat16).float().to(dev)  # upstream hands PiD the bf16-rounded latent
        sigma = torch.tensor(sigmas, dtype=torch.float32, device=dev)
        y = text.to(dev, torch.float32)
        t_list = schedule(steps, self.entry.sampler.t_list)
        size = self.output_size((h, w))
        self.last_check = None
        check = self.checks.get(size)
        unpadded = (seed_list[:b], y[:b], lq[:b], sigma[:b], t_list)  # the eager exact path needs no padding
        if check is not None and not check.passed:  # this size fell back to the exact path
            with fast_attention():
                return self._sample(self.exact_net, *unpadded)
        if not self.compiled:
            gate = contextlib.nullcontext()
        elif tuple(latents.shape) in self._warm_shapes:
            gate = _GATE.running()
        else:
            gate = _GATE.compiling()
        with gate, fast_attention():
            if self._helpers is None:
                images = self._sample(self.net, seed_list, y, lq, sigma, t_list)
            else:  # the same draws as sample() would take, in its order, drawn up front to send them
                generators = [torch.Generator(device=dev).manual_seed(int(s)) for s in seed_list]
                noise = draw_noise((len(seed_list), 3, *size), generators, dev)
                eps = [draw_noise(noise.shape, generators, dev) for _ in t_list[1:-1]]
                images = self._split_sample(DecodeInputs(noise, eps, y, lq, sigma, t_list))
        self._warm_shapes.add(tuple(latents.shape))
        if self.exact_net is not None and check is None:
            images = self._check_size(size, images[:b], unpadded)
        return images[:b]  # [b, 3, H, W]: without the copies

    def _check_size(self, size: tuple[int, int], images: Tensor, unpadded: tuple) -> Tensor:
        """The 8-bit check of an output size's first batch: its first image decoded again on the exact path. Returns
        the batch's images, decoded again on the exact path if the check failed."""
        seeds, y, lq, sigma, t_list = unpadded
        with fast_attention():
            exact = self._sample(self.exact_net, seeds[:1], y[:1], lq[:1], sigma[:1], t_list)
            self.checks[size] = self.last_check = check = compare_levels(images[0], exact[0], self.check_psnr)
            return images if check.passed else self._sample(self.exact_net, *unpadded)

    def _sample(self, net: PiDNet, seeds: list[int], y: Tensor, lq: Tensor, sigma: Tensor,
                t_list: Sequence[float]) -> Tensor:
        """`sample` with each item's noise drawn from a generator of its own seed (so a decode can be repeated)."""
        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        noise = draw_noise((len(seeds), 3, *self.output_size(lq.shape[-2:])), generators, self.device)
        return sample(net, noise, y, lq, sigma, t_list=t_list, generator=generators)

    def _split_sample(self, inputs: DecodeInputs) -> Tensor:
        helpers = self._helpers
        if helpers.lost_helper(wait_s=0) is not None:  # a helper died since the last decode
            helpers.close(stop_helpers=False)
        try:
            if not helpers.started:  # that, or a failed decode, ended the group
                inference.regroup_heads(self.net, helpers.start())
            helpers.send(inputs)
            images = sample(self.net, inputs.noise, inputs.text, inputs.latent, inputs.sigma, t_list=inputs.t_list,
                            eps=inputs.eps)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)  # a helper lost mid-decode shows after this
            helpers.check()
        except BaseException as e:
            lost = helpers.lost_helper()
            helpers.close(stop_helpers=False)
            if lost is not None:
                raise RuntimeError(f"{lost}; this decode is lost, the next one starts new helpers") from e
            raise
        return images

    def decode(self, latents: Tensor, prompts: Sequence[str] | None = None, prompt_embeds: Tensor | None = None,
               degrade_sigma: float | Sequence[float] = 0.0, seed: int | Sequence[int] = 0, steps: int = 4,
               bit_depth: int = 8) -> np.ndarray:
        """Latents [B, C, h, w] → images [B, H, W, 3] uint8 (uint16 with bit_depth=16).

        Give `prompts` (embedded through the cache, Gemma only for misses) or `prompt_embeds`
        [B, 300, 2304]; neither means the empty caption, the condition PiD saw for dropped captions.
        `degrade_sigma` is the latents' σ as their sampler gives it (SDXL: the Euler σ of an x_t), exactly as
        `pid decode` reads it; `decode_tensor` takes latents and σ already in the student's frame.
        """
        if latents.dim() == 3:
            latents = latents[None]
        if prompt_embeds is None:
            prompts = list(prompts) if prompts is not None else [""]
            if len(prompts) == 1:
                prompts = prompts * latents.shape[0]
            prompt_embeds = self.embed(prompts)
        sigmas = [float(degrade_sigma)] * latents.shape[0] if isinstance(degrade_sigma, (int, float)) else degrade_sigma
        latents, trained = self.to_trained_frame(latents, sigmas)
        return to_uint(self.decode_tensor(latents, prompt_embeds, trained, seed, steps), bit_depth)

    def to_trained_frame(self, latents: Tensor, sigmas: Sequence[float]) -> tuple[Tensor, list[float]]:
        """Stored latents [B, C, h, w] and their σ as given → the frame the student was trained in (SDXL's Euler
        x_t = x0 + σ·ε becomes the variance-preserving one; flow-matching backbones pass through)."""
        if len(sigmas) != latents.shape[0]:
            raise ValueError(f"batch of {latents.shape[0]} latents needs {latents.shape[0]} sigmas, got {len(sigmas)}")
        frame = self.entry.latent.sigma_frame
        pairs = [to_training_frame(z, float(s), frame) for z, s in zip(latents, sigmas, strict=True)]
        return torch.stack([z for z, _ in pairs]), [s for _, s in pairs]
