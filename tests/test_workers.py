"""`pid decode --devices A,B`: one worker process per device (pid_cli/decode/workers.py), run here on CPU devices.
The parent alone writes records and exits with the run's code; workers' images are those of a one-device
run; a killed worker's inputs and a Ctrl-C still leave one record per input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_faults import args, hidden, latents, pngs, run_cli, tiny  # noqa: F401 - `tiny` is a fixture

from pid_cli.decode import DecodeJob
from pid_cli.decode.workers import worker_jobs
from pid_cli.inputs import collect_inputs, take_shard


def test_workers_split_the_runs_own_shard_round_robin(tmp_path):
    for i in range(23):
        (tmp_path / f"{i:02d}.pt").write_bytes(b"")
    specs = collect_inputs([str(tmp_path)])
    job = DecodeJob(inputs=[str(tmp_path)], out=tmp_path / "out", entry=None, weights=None, shard=(1, 3),
                    devices=[torch.device("cuda:0"), torch.device("cuda:1")], json_stdout=True)
    jobs = worker_jobs(job)
    assert [j.shard for j in jobs] == [(1, 6), (4, 6)]
    assert [j.devices for j in jobs] == [[torch.device("cuda:0")], [torch.device("cuda:1")]]
    assert all(j.quiet and not j.json_stdout and j.manifest_out is None for j in jobs)  # the parent reports
    shares = [take_shard(specs, *j.shard) for j in jobs]
    assert sorted(s.path for share in shares for s in share) == sorted(s.path for s in take_shard(specs, 1, 3))
    assert abs(len(shares[0]) - len(shares[1])) <= 1


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_two_workers_decode_what_one_device_does_and_the_parent_writes_every_record(tiny):  # noqa: F811
    n = 7
    latents(tiny, n, shape=(16, 3, 3))
    one = tiny["root"] / "one"
    result, _ = run_cli([*args(tiny, "--devices", "cpu"), "--out", str(one)])
    assert result.exit_code == 0, result.output
    manifest = tiny["root"] / "records.jsonl"
    result, records = run_cli(args(tiny, "--devices", "cpu,cpu", "--json", "--manifest-out", str(manifest)))
    assert result.exit_code == 0, result.output
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny["inputs"].iterdir())
    assert all(r["status"] == "ok" for r in records)
    assert [json.loads(line) for line in manifest.read_text().splitlines()] == records
    assert result.output.count("is outside the trained sizes") == 1  # both workers met it; said once
    assert result.output.count(f"pid decode: {n} input(s): {n} decoded, 0 failed") == 1  # the parent sums up
    expected, got = pngs(one), pngs(tiny["out"])
    assert sorted(got) == sorted(expected) and len(expected) == n
    assert all(np.array_equal(got[name], expected[name]) for name in expected)  # seeds follow the input, not the device


def _spawn(t, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pid_cli.cli", *args(t, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _wait_for_pngs(t, proc: subprocess.Popen, count: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and len(list(t["out"].glob("*.png")) if t["out"].exists() else []) < count:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_killed_workers_inputs_are_recorded_as_failed(tiny):  # noqa: F811
    n = 24
    latents(tiny, n, shape=(16, 6, 6))
    proc = _spawn(tiny, "--devices", "cpu,cpu", "--batch-size", "1", "--json")
    _wait_for_pngs(tiny, proc, 2)
    workers = _children(proc.pid)  # the two workers (and multiprocessing's resource tracker)
    assert len(workers) >= 2
    os.kill(max(workers), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny["inputs"].iterdir())  # one each
    lost = [r for r in records if r["status"] == "failed"]
    assert lost and all("exited with code -9" in r["error"] for r in lost)
    # every PNG is complete (pngs() loads them) and every input recorded done has its own. A SIGKILL can land
    # after a PNG's atomic rename but before its record left the worker's queue: that input is recorded failed
    # while its complete PNG stays, which a rerun then skips.
    written = pngs(tiny["out"])
    done = {Path(o).name for r in records if r["status"] != "failed" for o in r["outputs"]}
    assert len(done) == n - len(lost) and done <= set(written) and len(written) <= n
    result, _ = run_cli(args(tiny, "--json"))  # and a rerun finishes the job
    assert result.exit_code == 0 and len(pngs(tiny["out"])) == n and hidden(tiny["out"]) == []


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_ctrl_c_stops_every_worker_with_one_record_per_input(tiny):  # noqa: F811
    n = 24
    latents(tiny, n, shape=(16, 6, 6))
    proc = _spawn(tiny, "--devices", "cpu,cpu", "--batch-size", "1", "--json")
    _wait_for_pngs(tiny, proc, 2)
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGINT)  # the parent only, as `kill -INT`; a terminal's Ctrl-C reaches all
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny["inputs"].iterdir())
    assert {r["status"] for r in records} <= {"ok", "failed"}
    assert sum(r["status"] == "ok" for r in records) == len(pngs(tiny["out"])) < n
    assert hidden(tiny["out"]) == [] and _all_gone(workers)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _all_gone(pids: list[int], within_s: float = 10.0) -> bool:
    """Whether every process in `pids` has ended within `within_s`. Multiprocessing's resource tracker (one of a
    multi-device run's children) exits when the parent's end closes its pipe, so on a loaded machine it can
    still be tearing down the instant the parent's exit code arrives; a process left behind stays alive."""
    deadline = time.monotonic() + within_s
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_workers_configuration_error_is_the_runs_usage_error(tiny):  # noqa: F811
    latents(tiny, 4, shape=(16, 2, 2))
    result, records = run_cli(args(tiny, "--devices", "cpu,cpu", "--matmul", "fp8", "--json"))
    assert result.exit_code == 2 and "--matmul fp8 needs an NVIDIA GPU" in result.output
    assert all(r["status"] == "failed" and "exited" not in r["error"] for r in records)  # stopped, not killed
    assert not tiny["out"].exists() or not pngs(tiny["out"])


def test_fail_fast_in_one_worker_stops_the_others(tiny):  # noqa: F811
    n = 16
    latents(tiny, n, shape=(16, 6, 6))
    torch.save({"x": "not a tensor"}, tiny["inputs"] / "00_bad.pt")  # sorts first: worker 0's first input
    result, records = run_cli(args(tiny, "--devices", "cpu,cpu", "--batch-size", "1", "--json", "--fail-fast"))
    assert result.exit_code == 1
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny["inputs"].iterdir())
    assert sum(r["status"] == "ok" for r in records) < n  # the other worker stopped early too
    assert any(r["error"] == "not decoded: the run stopped early" for r in records)
