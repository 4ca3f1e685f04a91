"""`pid decode --devices A,B`: one worker process per device (pid_cli/decode/workers.py), run here on CPU devices.
The parent alone writes records and exits with the run's code; workers' images are those of a one-device
run; a killed worker's inputs and a Ctrl-C still leave one record per input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import all_gone, args, children, hidden, latents, pngs, run_cli, spawn_decode, wait_for_pngs

from pid_cli.decode import DecodeJob
from pid_cli.decode.workers import worker_jobs
from pid_cli.inputs.collection import collect_inputs, take_shard


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
def test_two_workers_decode_what_one_device_does_and_the_parent_writes_every_record(tiny_run):
    n = 7
    latents(tiny_run, n, shape=(16, 3, 3))
    one = tiny_run["root"] / "one"
    result, _ = run_cli([*args(tiny_run, "--devices", "cpu"), "--out", str(one)])
    assert result.exit_code == 0, result.output
    manifest = tiny_run["root"] / "records.jsonl"
    result, records = run_cli(args(tiny_run, "--devices", "cpu,cpu", "--json", "--manifest-out", str(manifest)))
    assert result.exit_code == 0, result.output
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny_run["inputs"].iterdir())
    assert all(r["status"] == "ok" for r in records)
    assert [json.loads(line) for line in manifest.read_text().splitlines()] == records
    assert result.output.count("is outside the trained sizes") == 1  # both workers met it; said once
    assert result.output.count(f"pid decode: {n} input(s): {n} decoded, 0 failed") == 1  # the parent sums up
    expected, got = pngs(one), pngs(tiny_run["out"])
    assert sorted(got) == sorted(expected) and len(expected) == n
    assert all(np.array_equal(got[name], expected[name]) for name in expected)  # seeds follow the input, not the device


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_a_killed_workers_inputs_are_recorded_as_failed(tiny_run):
    n = 24
    latents(tiny_run, n, shape=(16, 6, 6))
    proc = spawn_decode(tiny_run, "--devices", "cpu,cpu", "--batch-size", "1", "--json")
    wait_for_pngs(tiny_run, proc, 2)
    workers = children(proc.pid)  # the two workers (and multiprocessing's resource tracker)
    assert len(workers) >= 2
    os.kill(max(workers), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny_run["inputs"].iterdir())  # one each
    lost = [r for r in records if r["status"] == "failed"]
    assert lost and all("exited with code -9" in r["error"] for r in lost)
    # every PNG is complete (pngs() loads them) and every input recorded done has its own. A SIGKILL can land
    # after a PNG's atomic rename but before its record left the worker's queue: that input is recorded failed
    # while its complete PNG stays, which a rerun then skips.
    written = pngs(tiny_run["out"])
    done = {Path(o).name for r in records if r["status"] != "failed" for o in r["outputs"]}
    assert len(done) == n - len(lost) and done <= set(written) and len(written) <= n
    result, _ = run_cli(args(tiny_run, "--json"))  # and a rerun finishes the job
    assert result.exit_code == 0 and len(pngs(tiny_run["out"])) == n and hidden(tiny_run["out"]) == []


@pytest.mark.slow  # a subprocess, signal or compile test: seconds of wall time
def test_ctrl_c_stops_every_worker_with_one_record_per_input(tiny_run):
    n = 24
    latents(tiny_run, n, shape=(16, 6, 6))
    proc = spawn_decode(tiny_run, "--devices", "cpu,cpu", "--batch-size", "1", "--json")
    wait_for_pngs(tiny_run, proc, 2)
    workers = children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGINT)  # the parent only, as `kill -INT`; a terminal's Ctrl-C reaches all
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny_run["inputs"].iterdir())
    assert {r["status"] for r in records} <= {"ok", "failed"}
    assert sum(r["status"] == "ok" for r in records) == len(pngs(tiny_run["out"])) < n
    assert hidden(tiny_run["out"]) == [] and all_gone(workers)


def test_a_workers_configuration_error_is_the_runs_usage_error(tiny_run):
    latents(tiny_run, 4, shape=(16, 2, 2))
    result, records = run_cli(args(tiny_run, "--devices", "cpu,cpu", "--matmul", "fp8", "--json"))
    assert result.exit_code == 2 and "--matmul fp8 needs an NVIDIA GPU" in result.output
    assert all(r["status"] == "failed" and "exited" not in r["error"] for r in records)  # stopped, not killed
    assert not tiny_run["out"].exists() or not pngs(tiny_run["out"])


def test_fail_fast_in_one_worker_stops_the_others(tiny_run):
    n = 16
    latents(tiny_run, n, shape=(16, 6, 6))
    torch.save({"x": "not a tensor"}, tiny_run["inputs"] / "00_bad.pt")  # sorts first: worker 0's first input
    result, records = run_cli(args(tiny_run, "--devices", "cpu,cpu", "--batch-size", "1", "--json", "--fail-fast"))
    assert result.exit_code == 1
    assert sorted(r["input"] for r in records) == sorted(str(p) for p in tiny_run["inputs"].iterdir())
    assert sum(r["status"] == "ok" for r in records) < n  # the other worker stopped early too
    assert any(r["error"] == "not decoded: the run stopped early" for r in records)
