"""One image split across devices (`Decoder(helper_devices=...)`, `pid decode --gpus-per-image N`), run here on
CPU devices over gloo: each device keeps its share of every attention's heads (model/heads.py), helper
processes run the same sampler in step (split.py). The split decode is the one-device decode, bit for bit; a
helper lost mid-decode fails that decode with the device named, and the next decode starts fresh helpers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, tiny_flux_entry
from helpers import alive, all_gone, args, children, hidden, latents, pngs, run_cli, wait_for_pngs
from PIL import Image

from pid_cli import pipeline
from pid_cli.decode import DecodeJob
from pid_cli.decode import job as decode_job
from pid_cli.decode.workers import worker_jobs
from pid_cli.model import PiDConfig, PiDNet, inference, load_weights
from pid_cli.model.heads import HeadShard
from pid_cli.registry import load_registry

DIE_MARKER = "PID_TEST_HELPER_DIES_IF"  # a file: the helper that finds it deletes it and exits mid-decode


@pytest.fixture
def entry(tmp_path):
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [tiny_flux_entry()]}))
    return load_registry([reg]).resolve("flux", "tiny")


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 16, 3, 2, generator=gen), torch.randn(batch, 12, 32, generator=gen)


def helper_pids() -> set[int]:
    """This process's living children that run a split decoder's helper."""
    found = set()
    for pid in children(os.getpid()):
        try:
            if b"pid_cli.split" in Path(f"/proc/{pid}/cmdline").read_bytes() and alive(pid):
                found.add(pid)
        except OSError:
            pass
    return found


def test_a_shard_keeps_the_qkv_rows_of_its_heads_only(entry):
    with torch.device("meta"):
        whole = PiDNet(PiDConfig.from_dict(entry.net_config))
    load_weights(whole, entry.weights.path)
    attention = whole.patch_blocks[0].attn
    rows = attention.qkv_x.weight.unflatten(0, (3, 2, -1))  # [q/k/v, heads, head_dim, in]
    with torch.device("meta"):
        half = PiDNet(PiDConfig.from_dict(entry.net_config))
    load_weights(half, entry.weights.path)
    inference.split_heads(half, HeadShard(rank=1, world=2, group="unused"))
    kept = half.patch_blocks[0].attn
    assert kept.heads == 1 and torch.equal(kept.qkv_x.weight, rows[:, 1:].flatten(0, 2))
    assert half.pixel_blocks[0].attn.qkv.weight.shape[0] == whole.pixel_blocks[0].attn.qkv.weight.shape[0] // 2
    with pytest.raises(ValueError, match="2 heads"):
        inference.split_heads(whole, HeadShard(rank=0, world=4, group="unused"))


def test_an_image_split_across_two_devices_is_the_one_device_image(entry):
    latent, text = inputs()
    single = pipeline.Decoder(entry, entry.weights.path, device="cpu")
    one = single.decode(latent, prompt_embeds=text, seed=5)
    one_deep = single.decode(latent[:1], prompt_embeds=text[:1], seed=[5], bit_depth=16)
    with pipeline.Decoder(entry, entry.weights.path, device="cpu", helper_devices=["cpu"]) as split:
        first = split.decode(latent, prompt_embeds=text, seed=5)
        second = split.decode(latent[:1], prompt_embeds=text[:1], seed=[5], bit_depth=16)
        helpers = list(split._helpers.helpers)
        assert len(helpers) == 1 and helper_pids() == {helpers[0].pid}
    assert np.array_equal(first, one)
    assert np.array_equal(second, one_deep)
    assert helpers[0].returncode == 0 and not helper_pids()  # close() stopped it cleanly


def test_heads_that_do_not_divide_are_refused_before_any_helper_starts(entry):
    with pytest.raises(ValueError, match=r"3 GPUs.*2 heads"):
        pipeline.Decoder(entry, entry.weights.path, device="cpu", helper_devices=["cpu", "cpu"])
    assert not helper_pids()


def dying_build(*args, **kwargs):
    """pipeline.build_network, except that the helper (rank 1) exits in the middle of a decode once (the marker
    file is the test's order); the helper process finds this function by name, in this module."""
    net = REAL_BUILD(*args, **kwargs)
    shard = args[3] if len(args) > 3 else kwargs.get("shard")
    marker = Path(os.environ[DIE_MARKER])
    if shard is not None and shard.rank == 1:
        velocity, calls = net.velocity, []

        def velocity_or_die(*a, **k):
            calls.append(1)
            if len(calls) % 4 == 2 and marker.exists():  # a decode's second sampler step: mid-decode
                marker.unlink()
                os._exit(3)
            return velocity(*a, **k)

        net.velocity = velocity_or_die
    return net


REAL_BUILD = pipeline.build_network


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_helper_lost_mid_decode_fails_that_decode_naming_its_device_and_the_next_decode_works(
        entry, tmp_path, monkeypatch):
    marker = tmp_path / "die"
    monkeypatch.setenv(DIE_MARKER, str(marker))  # spawned helpers inherit it
    monkeypatch.setattr(pipeline, "build_network", dying_build)
    latent, text = inputs(1)
    one = pipeline.Decoder(entry, entry.weights.path, device="cpu").decode(latent, prompt_embeds=text, seed=1)
    with pipeline.Decoder(entry, entry.weights.path, device="cpu", helper_devices=["cpu"]) as split:
        assert np.array_equal(split.decode(latent, prompt_embeds=text, seed=1), one)
        marker.touch()
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"helper process on cpu .*exited with code 3.*next one starts new"):
            split.decode(latent, prompt_embeds=text, seed=1)
        assert time.monotonic() - start < 30 and not marker.exists()  # it did die, and was noticed promptly
        assert np.array_equal(split.decode(latent, prompt_embeds=text, seed=1), one)  # on a fresh helper
        for helper in split._helpers.helpers:  # a helper dying between decodes: the next one restarts first
            helper.kill()
            helper.wait()
        assert np.array_equal(split.decode(latent, prompt_embeds=text, seed=1), one)
    assert not helper_pids()


def test_worker_jobs_group_devices_by_gpus_per_image():
    devices = [torch.device(f"cuda:{i}") for i in range(4)]
    job = DecodeJob(inputs=[], out=Path("out"), entry=None, weights=None, devices=devices, gpus_per_image=2)
    jobs = worker_jobs(job)
    assert [j.devices for j in jobs] == [devices[:2], devices[2:]]
    assert [j.shard for j in jobs] == [(0, 2), (1, 2)] and all(j.gpus_per_image == 2 for j in jobs)


def test_pid_decode_gpus_per_image_writes_the_one_device_pngs(tiny_run):
    latents(tiny_run, 3, shape=(16, 2, 3))
    one = tiny_run["root"] / "one"
    result, _ = run_cli([*args(tiny_run, "--devices", "cpu"), "--out", str(one)])
    assert result.exit_code == 0, result.output
    result, records = run_cli(args(tiny_run, "--devices", "cpu,cpu", "--gpus-per-image", "2", "--json"))
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in records] == ["ok"] * 3
    expected, got = pngs(one), pngs(tiny_run["out"])
    assert sorted(got) == sorted(expected) and len(expected) == 3
    assert all(np.array_equal(got[name], expected[name]) for name in expected)
    runtime = {Image.open(path).info["pid:runtime"] for path in tiny_run["out"].glob("*.png")}
    assert len(runtime) == 1 and ", cpu x2, float32, " in runtime.pop()  # the PNGs say the image was split
    assert not helper_pids()


def test_one_images_gpus_must_be_distinct():
    gpus = [torch.device(d) for d in ("cuda:0", "cuda:1", "cuda:2", "cuda:2")]
    job = DecodeJob(inputs=[], out=Path("out"), entry=types.SimpleNamespace(net_config={}), weights=None,
                    devices=gpus, gpus_per_image=2)
    with pytest.raises(ValueError, match=r"distinct GPUs, got cuda:2, cuda:2$"):
        decode_job._check_gpus_per_image(job)
    decode_job._check_gpus_per_image(replace(job, devices=[gpus[i] for i in (0, 1, 2, 1)]))  # two pairs, each distinct
    decode_job._check_gpus_per_image(replace(job, devices=[torch.device("cpu")] * 2))  # CPU ranks share the CPU


@pytest.mark.parametrize(("devices", "n", "message"), [
    ("cpu,cpu,cpu", "2", "--gpus-per-image 2 must divide the 3 device"),
    ("cpu", "2", "--gpus-per-image 2 must divide the 1 device"),
    ("cpu,cpu,cpu", "3", "3 GPUs.*2 heads"),
])
def test_gpus_per_image_that_cannot_be_arranged_is_a_usage_error(tiny_run, devices, n, message):
    latents(tiny_run, 1)
    result, _ = run_cli(args(tiny_run, "--devices", devices, "--gpus-per-image", n))
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not tiny_run["out"].exists() or not any(tiny_run["out"].iterdir())


def test_tiny_config_has_the_head_counts_these_tests_assume():
    config = tiny_config("v1_flux")
    assert PiDNet.attention_heads(config) == (2, 2)
    assert PiDNet.attention_heads({}) == (24, 16)  # the released networks' defaults


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_ctrl_c_in_a_terminal_finishes_the_split_decode_in_flight(tiny_run):
    n = 16
    latents(tiny_run, n, shape=(16, 6, 6))
    proc = subprocess.Popen([sys.executable, "-m", "pid_cli.cli", *args(tiny_run, "--devices", "cpu,cpu",
                                                                          "--gpus-per-image", "2", "--json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_pngs(tiny_run, proc, 2)
    helpers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole process group, helpers included
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny_run["inputs"].iterdir())
    assert sum(r["status"] == "ok" for r in records) == len(pngs(tiny_run["out"])) < n
    assert not any("helper" in (r["error"] or "") for r in records), records  # no decode lost to a helper
    assert hidden(tiny_run["out"]) == [] and helpers and all_gone(helpers)


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_plain_script_without_main_guard_or_close_decodes_split_and_exits(entry, tmp_path):
    script = tmp_path / "render.py"  # helpers must not re-run it (multiprocessing's spawn would)
    script.write_text(f"import sys, torch; sys.path[:0] = {sys.path[:1]!r}\n"
                      "from pid_cli.pipeline import Decoder\n"
                      "from pid_cli.registry import load_registry\n"
                      f"entry = load_registry([{str(entry.source)!r}]).resolve('flux', 'tiny')\n"
                      "dec = Decoder(entry, entry.weights.path, device='cpu', helper_devices=['cpu'])\n"
                      "dec.decode(torch.zeros(1, 16, 2, 2), prompt_embeds=torch.zeros(1, 12, 32))\n"
                      "print(dec._helpers.helpers[0].pid)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 1 and not alive(int(done.stdout))  # one decoder, its helper gone


def test_a_helper_that_cannot_start_fails_the_decoder_at_once(entry, monkeypatch):
    ghost = types.ModuleType("pid_test_ghost")  # importable here only: the helper's unpickling fails
    exec("def build(*args, **kwargs):\n    raise AssertionError('never called')", ghost.__dict__)
    monkeypatch.setitem(sys.modules, "pid_test_ghost", ghost)
    monkeypatch.setattr(pipeline, "build_network", ghost.build)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"helper process on cpu .*exited with code 1 while starting up"):
        pipeline.Decoder(entry, entry.weights.path, device="cpu", helper_devices=["cpu"])
    assert time.monotonic() - start < 60 and not helper_pids()  # not the group's 10-minute rendezvous timeout


def test_a_group_that_fails_to_form_leaves_no_helper_behind(entry, monkeypatch):
    from pid_cli import split

    def no_group(*args):
        raise RuntimeError("the rendezvous failed")

    monkeypatch.setattr(split, "_join", no_group)  # in this process only: the helper joins and waits for it
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="the rendezvous failed"):
        pipeline.Decoder(entry, entry.weights.path, device="cpu", helper_devices=["cpu"])
    assert not helper_pids() and time.monotonic() - start < 20  # killed, not left waiting in the rendezvous
