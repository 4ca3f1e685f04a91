"""Fault injection: full disks, read-only folders, out-of-memory batches, kill -9, two processes on one
output folder, damaged downloads, hostile files and pickles. End to end with the tiny fixture decoder
(conftest.tiny_run)."""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SURROGATE_PROMPT,
    args,
    code_pickle_pt,
    hidden,
    hostile_latents,
    latents,
    pngs,
    run_cli,
    torch_zip_bytes,
)
from PIL import Image
from safetensors.torch import save_file

from pid_cli import hub, outputs
from pid_cli.decode import plan, session
from pid_cli.inputs.latent_files import LatentError, read_latent_file
from pid_cli.model.weights import WeightsError, read_state_dict
from pid_cli.pipeline import Decoder
from pid_cli.registry import load_registry

try:
    from hubserver import fake_bytes, fake_hub, populate
except ImportError:  # tests/ imported as a package
    from tests.hubserver import fake_bytes, fake_hub, populate

__all__ = ["fake_hub"]  # the fixture, used by name below

def by_input(records):
    return {os.path.basename(r["input"]): r for r in records}


# ---------------------------------------------------------------------------------------------------------
# Full disk


class _FaultyOS:
    """Stands in for `os` inside pid_cli.outputs: writes (or fsyncs) of one output's temporary file fail
    with ENOSPC after half the bytes went out, like a disk that fills up mid-file."""

    def __init__(self, victim: str, where: str):
        self.victim, self.where, self.hits = victim, where, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def _is_victim(self, fd: int) -> bool:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(outputs.partial_name(self.victim)[:13])

    def write(self, fd, data):
        if self.where == "write" and self._is_victim(fd):
            self.hits += 1
            if self.hits == 1 and len(data) > 1:
                return os.write(fd, bytes(data[: len(data) // 2]))  # a short write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def fsync(self, fd):
        if self.where == "fsync" and self._is_victim(fd):
            self.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.fsync(fd)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_fails_that_input_only_and_leaves_no_partial_file(tiny_run, monkeypatch, where):
    latents(tiny_run, 3)
    faulty = _FaultyOS("01.png", where)
    monkeypatch.setattr(outputs, "os", faulty)
    result, records = run_cli(args(tiny_run, "--json"))
    assert faulty.hits and result.exit_code == 1
    rec = by_input(records)
    assert rec["01.safetensors"]["status"] == "failed" and "No space left on device" in rec["01.safetensors"]["error"]
    assert rec["00.safetensors"]["status"] == rec["02.safetensors"]["status"] == "ok"
    assert sorted(pngs(tiny_run["out"])) == ["00.png", "02.png"] and hidden(tiny_run["out"]) == []
    monkeypatch.setattr(outputs, "os", os)  # space freed: a rerun finishes the job
    result, records = run_cli(args(tiny_run, "--json"))
    assert result.exit_code == 0
    assert {k: r["status"] for k, r in by_input(records).items()} == {
        "00.safetensors": "skipped", "01.safetensors": "ok", "02.safetensors": "skipped"}
    assert sorted(pngs(tiny_run["out"])) == ["00.png", "01.png", "02.png"]


def test_full_disk_for_the_records_file_is_reported_and_exits_1(tiny_run):
    latents(tiny_run, 2)
    result, _ = run_cli(args(tiny_run, "--manifest-out", "/dev/full"))  # every write: ENOSPC
    assert result.exit_code == 1 and "cannot write records" in result.output
    assert sorted(pngs(tiny_run["out"])) == ["00.png", "01.png"]


def test_records_after_a_killed_runs_partial_line_start_on_a_fresh_line(tiny_run):
    latents(tiny_run, 1)
    records_file = tiny_run["root"] / "records.jsonl"
    records_file.write_text('{"input": "earlier", "status": "ok"}\n{"input": "cut off by kill -9", "sta')
    assert run_cli(args(tiny_run, "--manifest-out", str(records_file)))[0].exit_code == 0
    lines = records_file.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["status"] == "ok"


def test_unopenable_records_file_is_a_usage_error(tiny_run):
    latents(tiny_run, 1)
    result, _ = run_cli(args(tiny_run, "--manifest-out", str(tiny_run["root"] / "no" / "such" / "dir" / "r.jsonl")))
    assert result.exit_code == 2 and "--manifest-out" in result.output


# ---------------------------------------------------------------------------------------------------------
# Read-only output folder


def test_read_only_output_folder_is_refused_before_any_gpu_work(tiny_run, monkeypatch):
    latents(tiny_run, 2)
    tiny_run["out"].mkdir()
    tiny_run["out"].chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the folder's file system refuse, as a read-only mount does
        class ReadOnly:
            def __getattr__(self, name):
                return getattr(outputs.tempfile, name)

            @staticmethod
            def TemporaryFile(*a, **kw):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        monkeypatch.setattr(outputs, "tempfile", ReadOnly())

    def no_decoder(*a, **kw):
        raise AssertionError("work started for a run that cannot write its outputs")

    monkeypatch.setattr(session, "Decoder", no_decoder)
    monkeypatch.setattr(plan, "read_latent_file", no_decoder)  # not even the inputs are read
    monkeypatch.setattr(hub, "ensure_files", no_decoder)  # nor the checkpoint fetched
    try:
        result, _ = run_cli(args(tiny_run, "--json"))
    finally:
        tiny_run["out"].chmod(0o755)
    assert result.exit_code == 2 and "output folder is not writable" in result.output
    assert list(tiny_run["out"].iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Out of memory


def test_out_of_memory_retries_smaller_batches_then_single_images(tiny_run, monkeypatch):
    latents(tiny_run, 5)
    tiny_run["out"] = tiny_run["root"] / "reference"
    assert run_cli(args(tiny_run, "--batch-size", "1"))[0].exit_code == 0
    reference = pngs(tiny_run["out"])
    sizes = []
    decode = Decoder.decode_tensor

    def small_gpu(self, latents, *a, **kw):
        sizes.append(latents.shape[0])
        if latents.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return decode(self, latents, *a, **kw)

    monkeypatch.setattr(Decoder, "decode_tensor", small_gpu)
    tiny_run["out"] = tiny_run["root"] / "out"
    result, records = run_cli(args(tiny_run, "--batch-size", "4", "--json"))
    assert result.exit_code == 0 and all(r["status"] == "ok" for r in records)
    assert sizes == [4, 2, 1, 1, 2, 1, 1, 1]  # halved, then per image; the last batch of one fits at once
    got = pngs(tiny_run["out"])
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_compiled_runs_short_batches_are_padded_and_retried_unpadded_when_that_runs_out(tiny_run, monkeypatch):
    """`--compile on` (the compiler stood in by a counter that runs the graphs as they are): 5 inputs in batches
    of 2 run as 2, 2 and the last image padded to 2, which compiles nothing and says batch 2 in its PNG. Resuming
    the run after a PNG is lost decodes that image padded to 2 as well, to the same pixels. When the padded batch
    runs out of memory, its one image is retried alone before it would be called out of memory."""
    from torch._dynamo.testing import CompileCounter

    from pid_cli.model import inference

    monkeypatch.setenv("PID_CACHE_DIR", str(tiny_run["root"] / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tiny_run["root"] / "inductor"))
    counter = CompileCounter()
    compile_blocks = inference.compile_blocks
    monkeypatch.setattr(inference, "compile_blocks", lambda net: compile_blocks(net, backend=counter))
    latents(tiny_run, 5)
    tiny_run["out"] = tiny_run["root"] / "eager"
    assert run_cli(args(tiny_run, "--batch-size", "1"))[0].exit_code == 0
    eager = pngs(tiny_run["out"])
    ran, compiled, oom_at = [], [], {"call": None}
    decode = Decoder.decode_tensor

    def watched(self, latents, *a, pad_to=None, **kw):
        ran.append(max(pad_to or 0, len(latents)))
        if len(ran) == oom_at["call"]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        images = decode(self, latents, *a, pad_to=pad_to, **kw)
        compiled.append(counter.frame_count)
        return images

    monkeypatch.setattr(Decoder, "decode_tensor", watched)
    for label, oom in (("padded", None), ("retried", 3)):
        torch._dynamo.reset()
        ran.clear(), compiled.clear()
        oom_at["call"], tiny_run["out"] = oom, tiny_run["root"] / label
        result, records = run_cli(args(tiny_run, "--batch-size", "2", "--compile", "on", "--json"))
        assert result.exit_code == 0 and [r["status"] for r in records] == ["ok"] * 5
        got = pngs(tiny_run["out"])
        assert got.keys() == eager.keys() and all(np.abs(got[k].astype(int) - eager[k]).max() <= 1 for k in got)
        runtime = [Image.open(tiny_run["out"] / name).info["pid:runtime"] for name in sorted(got)]
        assert all(r.endswith("compiled, batch 2") for r in runtime[:4])
        if oom is None:
            assert ran == [2, 2, 2] and compiled[0] > 0 and compiled == compiled[:1] * 3  # the last compiles nothing
            assert runtime[4].endswith("compiled, batch 2")
            (tiny_run["out"] / "03.png").unlink()  # it was item 1 of its batch, beside 02; resumed, item 0 of copies
            ran.clear()
            assert run_cli(args(tiny_run, "--batch-size", "2", "--compile", "on"))[0].exit_code == 0
            resumed = pngs(tiny_run["out"])
            assert ran == [2] and all(np.array_equal(resumed[k], got[k]) for k in got)
            assert Image.open(tiny_run["out"] / "03.png").info["pid:runtime"] == runtime[3]
        else:
            assert ran == [2, 2, 2, 1] and runtime[4].endswith("compiled, batch 1")


def test_out_of_memory_even_for_one_image_is_reported_per_input(tiny_run, monkeypatch):
    latents(tiny_run, 3)

    def no_memory(self, latents, *a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Decoder, "decode_tensor", no_memory)
    result, records = run_cli(args(tiny_run, "--batch-size", "2", "--json"))
    assert result.exit_code == 1 and len(records) == 3
    assert all(r["status"] == "failed" and "out of GPU memory even at batch size 1" in r["error"] for r in records)
    assert not tiny_run["out"].exists() or pngs(tiny_run["out"]) == {}


# ---------------------------------------------------------------------------------------------------------
# Never a black PNG


def test_non_finite_decoder_output_fails_the_item_instead_of_writing_black(tiny_run, monkeypatch):
    latents(tiny_run, 2)
    decode = Decoder.decode_tensor

    def nan_for_the_second(self, latents, *a, **kw):
        images = decode(self, latents, *a, **kw).clone()  # (an inference tensor cannot be edited in place)
        images[1:] = float("nan")
        return images

    monkeypatch.setattr(Decoder, "decode_tensor", nan_for_the_second)
    result, records = run_cli(args(tiny_run, "--batch-size", "2", "--json"))
    rec = by_input(records)
    assert result.exit_code == 1 and rec["00.safetensors"]["status"] == "ok"
    assert rec["01.safetensors"]["status"] == "failed" and "NaN/Inf" in rec["01.safetensors"]["error"]
    assert list(pngs(tiny_run["out"])) == ["00.png"]


def test_overflowing_latent_is_refused_before_decoding(tiny_run, monkeypatch):
    save_file({"x": torch.full((16, 2, 2), 1e20)}, tiny_run["inputs"] / "loud.safetensors")  # decodes to NaN
    monkeypatch.setattr(Decoder, "decode_tensor", lambda *a, **kw: pytest.fail("decoded a refused latent"))
    result, records = run_cli(args(tiny_run, "--json"))
    assert result.exit_code == 1 and "latent values reach 1e+20" in records[0]["error"]


# ---------------------------------------------------------------------------------------------------------
# Hostile inputs in one run: each fails alone, nothing escapes --out, no traceback


def test_hostile_inputs_each_fail_alone(tiny_run):
    marker = tiny_run["root"] / "PWNED"
    bad = hostile_latents(tiny_run["inputs"], marker)
    latents(tiny_run, 2)
    odd = tiny_run["inputs"] / os.fsdecode(b"good_\xff.safetensors")  # an undecodable byte in a good file's name
    save_file({"x": torch.randn(16, 2, 2)}, odd)
    records_file = tiny_run["root"] / "records.jsonl"
    result, records = run_cli(args(tiny_run, "--json", "--manifest-out", str(records_file)))
    assert result.exit_code == 1
    rec = {r["input"]: r for r in records}
    assert len(records) == len(bad) + 3 and len(rec) == len(records)
    for path in bad.values():
        assert rec[str(path)]["status"] == "failed" and str(path) in rec[str(path)]["error"], rec[str(path)]
    for name in ("00.safetensors", "01.safetensors", odd.name):
        assert rec[str(tiny_run["inputs"] / name)]["status"] == "ok", rec[str(tiny_run["inputs"] / name)]
    assert sorted(pngs(tiny_run["out"])) == sorted(["00.png", "01.png", odd.with_suffix(".png").name])
    assert [json.loads(line) for line in records_file.read_text().splitlines()] == records  # \udcff escapes
    assert not marker.exists()


def test_manifest_outputs_cannot_escape_the_output_folder(tiny_run):
    latents(tiny_run, 7)
    outside = tiny_run["root"] / "outside"
    outside.mkdir()
    tiny_run["out"].mkdir()
    (tiny_run["out"] / "link").symlink_to(outside)
    (tiny_run["out"] / "taken.png").mkdir()  # a folder where a PNG should go
    names = ["../escape.png", str(outside / "abs.png"), "link/through_symlink.png", "sub/../../up.png", ".",
             "taken.png", "fine/ok.png"]
    manifest = tiny_run["root"] / "m.jsonl"
    manifest.write_text("".join(json.dumps({"input": f"in/{i:02d}.safetensors", "output": name,
                                            "prompt": SURROGATE_PROMPT}) + "\n" for i, name in enumerate(names)))
    result, records = run_cli(args(tiny_run, "--json", inputs=manifest))
    assert result.exit_code == 1
    errors = [r["error"] for r in records]
    assert [r["status"] for r in records] == ["failed"] * 6 + ["ok"]
    assert "leaves the output folder" in errors[0] and "is absolute" in errors[1]
    assert "leaves the output folder" in errors[2] and "leaves the output folder" in errors[3]
    assert "not a .png" in errors[4] and "exists and is not a file" in errors[5]
    assert list(outside.iterdir()) == [] and not (tiny_run["root"] / "escape.png").exists()
    assert not (tiny_run["root"] / "up.png").exists()
    with Image.open(tiny_run["out"] / "fine" / "ok.png") as im:  # the unencodable prompt did not fail the image
        assert im.info["pid:prompt"] == "a caf?"


def test_interrupt_during_the_prepass_still_writes_one_record_per_input(tiny_run, monkeypatch):
    latents(tiny_run, 6)
    probe = session.probe_input

    def interrupted(job, spec):
        if spec.path.name == "00.safetensors":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the inputs are being read
            time.sleep(0.2)
        return probe(job, spec)

    monkeypatch.setattr(session, "probe_input", interrupted)
    result, records = run_cli(args(tiny_run, "--json"))
    assert result.exit_code == 130 and len(records) == 6 and len(by_input(records)) == 6
    assert all(r["status"] == "failed" and "stopped early" in r["error"] for r in records)
    assert not tiny_run["out"].exists() or pngs(tiny_run["out"]) == {}


# ---------------------------------------------------------------------------------------------------------
# kill -9 and two processes on one folder


def _spawn(t, *extra):
    return subprocess.Popen([sys.executable, "-m", "pid_cli.cli", *args(t, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_kill_9_leaves_only_complete_pngs_and_a_rerun_finishes(tiny_run):
    n = 24
    latents(tiny_run, n, shape=(16, 6, 6))
    proc = _spawn(tiny_run, "--batch-size", "1")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tiny_run["out"].glob("*.png")) if tiny_run["out"].exists() else []) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = pngs(tiny_run["out"])  # each one loads completely
    assert 2 <= len(done) < n
    assert all(p.endswith(".part") for p in hidden(tiny_run["out"]))  # at most an abandoned temporary file
    result, records = run_cli(args(tiny_run, "--json"))
    assert result.exit_code == 0 and len(pngs(tiny_run["out"])) == n and hidden(tiny_run["out"]) == []
    assert sum(r["status"] == "skipped" for r in records) == len(done)
    assert sum(r["status"] == "ok" for r in records) == n - len(done)


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_two_processes_on_one_output_folder_never_both_write_a_file(tiny_run):
    n = 16
    latents(tiny_run, n, shape=(16, 3, 3))
    procs = [_spawn(tiny_run, "--batch-size", "1", "--json", "--seed", str(k)) for k in (0, 1)]  # seed marks the writer
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    records = [[json.loads(line) for line in o[0].splitlines()] for o in outs]
    assert all(len(r) == n for r in records)
    assert all(r["status"] in ("ok", "skipped") for rs in records for r in rs)
    files = sorted(tiny_run["out"].glob("*.png"))
    assert len(files) == n and hidden(tiny_run["out"]) == []
    writers = {}
    for p in files:
        with Image.open(p) as im:
            im.load()
            writers[p.name] = im.info["pid:seed"]
        assert p.stat().st_nlink == 1
    assert set(writers.values()) <= {"0", "1"}


def test_concurrent_writers_of_one_path_leave_exactly_one_complete_file(tmp_path):
    target = tmp_path / "x.png"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    won, lost = [], []
    barrier = threading.Barrier(len(payloads))

    def write(data):
        barrier.wait()
        try:
            outputs.write_atomic(target, data)
            won.append(data)
        except outputs.OutputExists:
            lost.append(data)

    threads = [threading.Thread(target=write, args=(d,)) for d in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7 and target.read_bytes() == won[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_cleaning_partials_spares_files_being_written_and_removes_abandoned_ones(tmp_path):
    live = tmp_path / ".pid-0123456789abcdef.part"  # as write_atomic names its temporary files
    live.write_bytes(b"half")
    fd = os.open(live, os.O_RDWR)
    assert outputs._lock(fd, blocking=True)  # a writer in another process holds its temporary file like this
    assert outputs.clean_partials(tmp_path) == 0 and live.exists()
    os.close(fd)  # the writer died (its locks die with it)
    assert outputs.clean_partials(tmp_path) == 1 and not live.exists()
    # and across processes: a writer killed with its file open and locked
    code = ("import os, sys, time; from pid_cli import outputs; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "outputs._lock(fd, True); print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(live)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    assert outputs.clean_partials(tmp_path) == 0 and live.exists()
    child.kill()
    child.wait()
    assert outputs.clean_partials(tmp_path) == 1 and not live.exists()


# ---------------------------------------------------------------------------------------------------------
# Pickles: weights_only everywhere, code never runs, claimed sizes never allocated


def test_no_code_path_unpickles_arbitrary_objects():
    """Every torch.load passes weights_only=True, np.load allow_pickle=False; no pickle/yaml.load at all."""
    found = []
    for path in sorted(Path(hub.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.name}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                found.append(where)
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if (owner, node.func.attr) == ("np", "load"):
                assert isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False, where
            assert (owner, node.func.attr) not in {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                                                   ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                                                   ("torch", "jit")}, where
    assert len(found) >= 2  # inputs/latent_files.py and model/weights.py


@pytest.mark.parametrize("legacy", [False, True])
def test_code_executing_pickles_are_refused_by_every_reader(tmp_path, legacy):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    path.write_bytes(code_pickle_pt(marker, legacy=legacy))
    with pytest.raises(LatentError, match=r"refused|not a PyTorch zip archive"):
        read_latent_file(path)
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_pth_with_huge_declared_storage_is_refused_without_allocating(tmp_path):
    path = tmp_path / "model_ema_bf16.pth"
    path.write_bytes(torch_zip_bytes(1 << 40, (1 << 20, 1 << 20), (1 << 20, 1), bytes(64)))  # claims 4 TiB
    with pytest.raises(WeightsError, match="not a readable PyTorch weight file"):
        read_state_dict(path)  # read with mmap: torch refuses the view before touching memory
    with pytest.raises(LatentError, match=r"record size|not resizable"):  # memory-mapped: refused, nothing allocated
        read_latent_file(path)


# ---------------------------------------------------------------------------------------------------------
# Downloads: a damaged cached copy is detected, never loaded, and fetched again


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_file_is_detected_and_fetched_again(fake_hub, damage, capsys, monkeypatch):
    reg = load_registry(use_env=False)
    populate(fake_hub, reg.entries)
    entry = reg.resolve("flux", "2k")
    good = fake_bytes(entry.weights.path)
    path = hub.ensure_files(entry, vae=False, text_encoder=False).weights
    blob = path.resolve()
    if damage == "truncate":
        with open(blob, "r+b") as f:
            f.truncate(len(good) // 3)
    else:  # same size, one bit off, mtime kept: only the hash can tell
        stat = blob.stat()
        data = bytearray(good)
        data[100] ^= 1
        blob.write_bytes(bytes(data))
        os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    gets = len(fake_hub.requested("GET", entry.weights.path))
    again = hub.ensure_files(entry, vae=False, text_encoder=False).weights
    assert again.read_bytes() == good
    assert len(fake_hub.requested("GET", entry.weights.path)) == gets + 1
    assert "failed its size/hash check" in capsys.readouterr().err
    # offline, the damage is found the same way, and the copy is deleted instead of used
    with open(again.resolve(), "r+b") as f:
        f.truncate(10)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.VerificationError, match="mismatch"):
        hub.ensure_files(entry, vae=False, text_encoder=False)
    assert not again.resolve().exists()


def test_an_inputs_unreadable_or_unembedded_prompt_fails_that_input_only(tiny_run):
    latents(tiny_run, 3)
    (tiny_run["inputs"] / "00.txt").write_text("a red fox")
    (tiny_run["inputs"] / "01.txt").write_bytes(b"\xff\xfe not utf-8")
    (tiny_run["inputs"] / "02.txt").write_text("a prompt the embeddings file lacks")
    result, records = run_cli(args(tiny_run, "--json"))
    rec = by_input(records)
    assert result.exit_code == 1 and rec["00.safetensors"]["status"] == "ok"
    assert rec["01.safetensors"]["status"] == "failed" and "01.txt" in rec["01.safetensors"]["error"]
    assert rec["02.safetensors"]["status"] == "failed" and "has no embedding" in rec["02.safetensors"]["error"]
    assert list(pngs(tiny_run["out"])) == ["00.png"]
    (tiny_run["inputs"] / "00.txt").write_text("yet another prompt")  # nothing left to decode: still clean
    result, records = run_cli(args(tiny_run, "--json", "--overwrite"))
    assert result.exit_code == 1 and all(r["status"] == "failed" for r in records) and len(records) == 3


def test_unencodable_prompt_is_embedded_by_gemma_not_a_crash(tmp_path, monkeypatch):
    import shutil

    from helpers import TINY_GEMMA, train_tokenizer

    from pid_cli.text import embed_prompts

    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    snap = tmp_path / "gemma"
    shutil.copytree(TINY_GEMMA, snap)
    train_tokenizer().save(str(snap / "tokenizer.json"))
    (snap / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "pad_token": "<pad>"}))
    odd = embed_prompts([SURROGATE_PROMPT], text_encoder=snap, device="cpu", model_max_length=300)
    plain = embed_prompts(["a caf?"], text_encoder=snap, device="cpu", model_max_length=300)
    assert torch.equal(odd, plain) and torch.isfinite(odd).all()
