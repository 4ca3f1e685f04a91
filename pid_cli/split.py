"""One image decoded on several GPUs at once: the helper processes of a split `Decoder`.

`Decoder(..., helper_devices=[...])` runs each attention's heads spread over its own device and the helpers'
(model/heads.py); the rest of the network runs whole on each. The Decoder's process leads: before each decode
it broadcasts the decode's inputs, the noise and every re-noising draw included (so helpers need no random
generators and every device samples the same numbers), and every process then runs the same sampler, meeting
at each attention's all-gather. Helpers throw their images away.

Helpers are fresh interpreters (`python -c HELPER_MAIN`), told what to build in a JSON file: multiprocessing's
spawn would re-run the user's script in each of them.

Failures: a helper that raises exits (one that does so while starting up fails the Decoder at once); a helper
whose leader is gone exits. The leader watches its helpers: when one exits, the group is aborted, so the
leader's decode fails with the helper's exit code instead of waiting forever. A failed decode (the leader's own
error too, such as running out of memory) ends the group; the next decode starts fresh helpers. Helpers ignore
SIGINT and SIGTERM, which a terminal or a scheduler sends to every process: the leader finishes the decode in
flight and stops them.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pid_cli.model import PiDNet
from pid_cli.model.heads import HeadShard, check_divides

POLL_S = 0.5
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waits this long for a peer that neither runs nor dies
DECODE, STOP = 1, 0
HEADER = 10  # command, latent [b, C, h, w], image [H, W], text [T, D], timesteps

# (device, shard) → the network, ready to decode: a partial of a module-level function with JSON arguments
Build = functools.partial


@dataclass
class DecodeInputs:
    """What every device of the group samples from."""

    noise: Tensor  # [b, 3, H, W] float32
    eps: list[Tensor]  # one re-noising draw per intermediate step, each like noise
    text: Tensor  # [b, T, D] float32
    latent: Tensor  # [b, C, h, w] float32
    sigma: Tensor  # [b] float32
    t_list: list[float]


class HelperGroup:
    """The helper processes of one split decoder and the process group they share with this process (rank 0).

    torch.distributed allows one default process group per process, hence one split decoder per process."""

    def __init__(self, devices: Sequence[torch.device], build: Build):
        self.devices = list(devices)  # check_split has accepted them
        self.build = build
        json.dumps(self._recipe())  # refuse a build the helpers could not be given now, not in a helper
        self.helpers: list[subprocess.Popen] = []
        self.failure: str | None = None
        self._closing = threading.Event()
        self._store_dir: str | None = None

    @property
    def started(self) -> bool:
        return bool(self.helpers)

    def start(self) -> HeadShard:
        """Spawn the helpers and form the group; returns this process's shard."""
        if dist.is_initialized():
            raise ValueError("this process already belongs to a torch.distributed process group; a decoder split "
                             "across GPUs needs its own (one split decoder per process)")
        self.failure = None
        self._closing = threading.Event()  # this group's own: an earlier group's watcher may not have woken yet
        self._store_dir = tempfile.mkdtemp(prefix="pid-split-")
        store_path, payload = (os.path.join(self._store_dir, name) for name in ("store", "helper.json"))
        with open(payload, "w") as f:
            json.dump(self._recipe(), f)
        # fresh interpreters (see the module's docstring) that import what this process does through PYTHONPATH
        path = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
        self.helpers = [subprocess.Popen([sys.executable, "-c", HELPER_MAIN, payload, str(rank), store_path,
                                          str(os.getpid())], env={**os.environ, "PYTHONPATH": path})
                        for rank in range(1, len(self.devices))]
        atexit.register(self.close)  # a process that ends without close() stops its helpers too
        self._await_helpers()
        threading.Thread(target=self._watch, args=(list(self.helpers), self._closing), daemon=True).start()
        try:
            shard = _join(self.devices, 0, store_path)
            self.check()
        except BaseException:
            self.close(stop_helpers=False)  # helpers that never formed a group have nothing to be told
            raise
        return shard

    def _recipe(self) -> dict[str, Any]:
        """What a helper needs, as JSON (no pickles: nothing in pid unpickles): the build function by name, its
        arguments, the devices."""
        func = self.build.func
        return {"build": f"{func.__module__}:{func.__qualname__}", "args": list(self.build.args),
                "kwargs": self.build.keywords, "devices": [str(d) for d in self.devices]}

    def _await_helpers(self) -> None:
        """Wait until every helper has started up and is about to join the group: the group's rendezvous would
        wait out TIMEOUT for a helper that died before it (an import error, a build function it cannot find)."""
        waiting = set(range(1, len(self.devices)))
        while waiting:
            for rank in list(waiting):
                if os.path.exists(_ready_path(self._store_dir, rank)):
                    waiting.discard(rank)
                elif (code := self.helpers[rank - 1].poll()) is not None:
                    failure = f"{self._exited(rank, code)} while starting up (its error is above)"
                    self.close(stop_helpers=False)
                    raise RuntimeError(failure)
            time.sleep(0.05)

    def send(self, inputs: DecodeInputs) -> None:
        """Broadcast one decode's inputs to the helpers (they then run it in step with this process)."""
        device = _comm_device(self.devices[0])
        b, c, h, w = inputs.latent.shape
        header = [DECODE, b, c, h, w, *inputs.noise.shape[2:], *inputs.text.shape[1:], len(inputs.t_list)]
        dist.broadcast(torch.tensor(header, dtype=torch.int64, device=device), src=0)
        for tensor in _tensors(inputs):
            dist.broadcast(tensor.to(device).contiguous(), src=0)

    def check(self) -> None:
        """Raise if a helper failed during the decode just run (its result is then not to be trusted)."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def lost_helper(self, wait_s: float = 2 * POLL_S) -> str | None:
        """After a failed decode: why, if a helper exited. Its death shows in this process's collective before
        its exit code does, hence the short wait."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, helper in enumerate(self.helpers, start=1):
                if helper.poll() is not None:
                    return self._exited(rank, helper.returncode)
            if time.monotonic() >= deadline:
                return self.failure
            time.sleep(0.05)

    def close(self, stop_helpers: bool = True) -> None:
        """End the group: tell the helpers to stop (after a failure: kill them) and leave it."""
        if not self.helpers:
            return
        atexit.unregister(self.close)
        self._closing.set()
        if stop_helpers and self.failure is None:
            with contextlib.suppress(Exception):
                stop = torch.zeros(HEADER, dtype=torch.int64, device=_comm_device(self.devices[0]))
                dist.broadcast(stop, src=0)
        deadline = time.monotonic() + 30
        for helper in self.helpers:
            if not stop_helpers or self.failure is not None:
                helper.kill()  # helpers ignore SIGTERM (see HELPER_MAIN) and hold nothing worth saving
            try:
                helper.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        with contextlib.suppress(Exception):
            if self.failure is None and stop_helpers:
                dist.destroy_process_group()
            else:
                dist.distributed_c10d._abort_process_group()
                dist.destroy_process_group()
        self.helpers = []
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None

    def _watch(self, helpers: list[subprocess.Popen], closing: threading.Event) -> None:
        while not closing.is_set():
            for rank, helper in enumerate(helpers, start=1):
                if helper.poll() is not None and not closing.is_set():
                    self.failure = self._exited(rank, helper.returncode)
                    with contextlib.suppress(Exception):  # unblock this process's collectives
                        dist.distributed_c10d._abort_process_group()
                    return
            time.sleep(POLL_S)

    def _exited(self, rank: int, code: int) -> str:
        return (f"the helper process on {self.devices[rank]} (one image split across {len(self.devices)} devices) "
                f"exited with code {code}")


def check_split(devices: Sequence[torch.device], net_config: dict) -> None:
    """Refuse, before any process starts, one image on `devices` that cannot be: each attention's heads must
    split evenly, and NCCL puts one process on each GPU, so the GPUs must differ ("cuda" is the current one)."""
    check_divides(len(devices), PiDNet.attention_heads(net_config))
    indices = [torch.cuda.current_device() if d.index is None else d.index for d in devices if d.type == "cuda"]
    if len(set(indices)) != len(indices):
        raise ValueError(f"one image split across GPUs needs distinct GPUs, got {', '.join(map(str, devices))}")


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def _join(devices: Sequence[torch.device], rank: int, store_path: str) -> HeadShard:
    device = devices[rank]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store_path, len(devices)), rank=rank,
                            world_size=len(devices), timeout=TIMEOUT, device_id=device if cuda else None)
    return HeadShard(rank, len(devices), dist.group.WORLD.group_name)


def _ready_path(folder: str, rank: int) -> str:
    return os.path.join(folder, f"ready-{rank}")


def _tensors(inputs: DecodeInputs) -> list[Tensor]:
    return [inputs.noise, *inputs.eps, inputs.text, inputs.latent, inputs.sigma,
            torch.tensor(inputs.t_list, dtype=torch.float64)]


def _receive(device: torch.device) -> DecodeInputs | None:
    comm = _comm_device(device)
    header = torch.empty(HEADER, dtype=torch.int64, device=comm)
    dist.broadcast(header, src=0)
    command, b, c, h, w, height, width, t, d, n_t = header.tolist()
    if command == STOP:
        return None

    def take(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        tensor = torch.empty(shape, dtype=dtype, device=comm)
        dist.broadcast(tensor, src=0)
        return tensor.to(device)

    image = (b, 3, height, width)
    noise = take(image)
    eps = [take(image) for _ in range(n_t - 2)]
    text, latent, sigma = take((b, t, d)), take((b, c, h, w)), take((b,))
    return DecodeInputs(noise, eps, text, latent, sigma, take((n_t,), torch.float64).tolist())


# A terminal's Ctrl-C, or a scheduler's SIGTERM to every process of a job, reaches helpers too: the leader decides
# (it finishes the images in flight, then stops them), so a helper ignores both from its first line on and dies
# only with its leader or by SIGKILL.
HELPER_MAIN = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, "
               "signal.SIG_IGN); import sys; from pid_cli.split import helper_main; helper_main(*sys.argv[1:])")


def helper_main(payload: str, rank: str, store_path: str, leader: str) -> None:
    """A helper process's life: join the group, build its share of the network, run decodes until told to stop."""
    from pid_cli.model.layers import fast_attention
    from pid_cli.sampler import sample

    def watch_leader() -> None:
        while os.getppid() == int(leader):
            time.sleep(POLL_S)
        os._exit(1)  # the leader is gone: nobody will ever send the next decode

    threading.Thread(target=watch_leader, daemon=True).start()
    try:
        with open(payload) as f:
            recipe = json.load(f)
        module, _, name = recipe["build"].partition(":")
        build = functools.partial(getattr(importlib.import_module(module), name), *recipe["args"],
                                  **recipe["kwargs"])
        devices = [torch.device(d) for d in recipe["devices"]]
        open(_ready_path(os.path.dirname(payload), int(rank)), "w").close()
        device = devices[int(rank)]
        shard = _join(devices, int(rank), store_path)
        net = build(device, shard)
        while (inputs := _receive(device)) is not None:
            with torch.inference_mode(), fast_attention():
                sample(net, inputs.noise, inputs.text, inputs.latent, inputs.sigma, t_list=inputs.t_list,
                       eps=inputs.eps)
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # not a clean exit: the leader's collectives must not wait on this process
