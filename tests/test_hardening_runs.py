"""Hardening round 2: shared farm folders, schedulers, special files and hostile sizes cannot make a run lose,
duplicate or misplace work, hang, or read without bound. One test per class of fault, each with the example
that showed it."""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_flux_entry
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pid_cli import outputs
from pid_cli.cli import app
from pid_cli.decode import plan, session
from pid_cli.inputs.collection import InputError, collect_inputs, shard_from_env, take_shard
from pid_cli.inputs.latent_files import MAX_LATENT_BYTES, LatentError, read_latent_file
from pid_cli.text import save_prompt_embeds


@pytest.fixture
def tiny(tmp_path):
    reg = tmp_path / "registry.yaml"
    reg.write_text(yaml.safe_dump({"version": 1, "entries": [tiny_flux_entry()]}))
    emb = tmp_path / "emb.safetensors"
    save_prompt_embeds(emb, ["", "x", "y"], torch.randn(3, 12, 32, generator=torch.Generator().manual_seed(0)))
    (tmp_path / "in").mkdir()
    return {"reg": reg, "emb": emb, "in": tmp_path / "in", "out": tmp_path / "out", "root": tmp_path}


def _decode(t, *inputs: str | Path, extra: tuple[str, ...] = ()):
    args = ["decode", *map(str, inputs or [t["in"]]), "--backbone", "flux", "--variant", "tiny", "--registry",
            str(t["reg"]), "--prompt-embeds", str(t["emb"]), "--out", str(t["out"]), "--quiet", "--json", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result, [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _latent(t, name: str, seed: int = 0) -> Path:
    path = t["in"] / name
    save_file({"latent": torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(seed))}, path)
    return path


def _manifest(t, rows: list[dict]) -> Path:
    path = t["root"] / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pngs(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------
# Output identity: one file by two spellings is claimed once; the later input is refused, and says why.

def test_two_spellings_of_one_output_are_refused_not_both_recorded_ok(tiny):
    _latent(tiny, "a.safetensors", 1)
    _latent(tiny, "b.safetensors", 2)
    (tiny["out"] / "real").mkdir(parents=True)
    (tiny["out"] / "alias").symlink_to(tiny["out"] / "real")
    cases = [("x.png", "sub/../x.png"), ("real/y.png", "alias/y.png")]
    for first, second in cases:
        result, records = _decode(tiny, _manifest(tiny, [{"input": "in/a.safetensors", "output": first},
                                                         {"input": "in/b.safetensors", "output": second}]))
        assert result.exit_code == 1
        status = {Path(r["input"]).name: r for r in records}
        assert status["a.safetensors"]["status"] == "ok" and status["b.safetensors"]["status"] == "failed"
        assert "by another spelling" in status["b.safetensors"]["error"]


def test_on_a_case_insensitive_file_system_a_png_and_A_png_are_one_file(tiny, monkeypatch):
    monkeypatch.setattr(session, "ignores_case", lambda folder: True)  # what macOS and Windows file systems do
    _latent(tiny, "a.safetensors", 1)
    _latent(tiny, "b.safetensors", 2)
    result, records = _decode(tiny, _manifest(tiny, [{"input": "in/a.safetensors", "output": "Cat.png"},
                                                     {"input": "in/b.safetensors", "output": "cat.png"}]))
    status = {Path(r["input"]).name: r["status"] for r in records}
    assert result.exit_code == 1 and status == {"a.safetensors": "ok", "b.safetensors": "failed"}
    assert outputs.ignores_case(tiny["root"]) is False  # this machine's file system tells the two apart


# ---------------------------------------------------------------------------------------------------------
# Duplicate inputs: each listed job gets its record; only exact duplicates merge, and the run says so.

def test_a_file_listed_with_two_prompts_is_two_jobs(tiny):
    _latent(tiny, "a.safetensors")
    result, records = _decode(tiny, _manifest(tiny, [
        {"input": "in/a.safetensors", "prompt": "x", "output": "a_x.png"},
        {"input": "in/a.safetensors", "prompt": "y", "output": "a_y.png"}]))
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in records] == ["ok", "ok"] and _pngs(tiny["out"]) == ["a_x.png", "a_y.png"]
    prompts = {Image.open(tiny["out"] / n).text["pid:prompt"] for n in ("a_x.png", "a_y.png")}
    assert prompts == {"x", "y"}


def test_a_symlink_alias_in_a_folder_is_its_own_job(tiny):
    _latent(tiny, "a.safetensors")
    (tiny["in"] / "alias.safetensors").symlink_to(tiny["in"] / "a.safetensors")
    result, records = _decode(tiny)
    assert result.exit_code == 0 and len(records) == 2 and _pngs(tiny["out"]) == ["a.png", "alias.png"]


def test_exact_duplicates_merge_and_say_so(tiny):
    path = _latent(tiny, "a.safetensors")
    result, records = _decode(tiny, path, path, tiny["in"])
    assert result.exit_code == 0 and len(records) == 1
    assert "note: 2 input(s) were listed more than once with the same settings" in result.stderr
    same_output_other_prompt = _manifest(tiny, [{"input": "in/a.safetensors", "prompt": "x"},
                                                {"input": "in/a.safetensors", "prompt": "y"}])
    result, records = _decode(tiny, same_output_other_prompt, extra=("--overwrite",))
    assert result.exit_code == 1 and sorted(r["status"] for r in records) == ["failed", "ok"]
    failed = next(r for r in records if r["status"] == "failed")
    assert "the same input listed again with other settings" in failed["error"]


# ---------------------------------------------------------------------------------------------------------
# Shares from the scheduler: every input exactly once, whatever the environment; what cannot be mapped, refused.

def _slurm_array(first: int, last: int, step: int = 1) -> list[dict[str, str]]:
    ids = list(range(first, last + 1, step))
    return [{"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_MAX": str(ids[-1]),
             "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(len(ids))} for i in ids]


def _within(outer: list[dict[str, str]], ranks: int, names: tuple[str, str]) -> list[dict[str, str]]:
    return [{**env, names[0]: str(r), names[1]: str(ranks)} for env in outer for r in range(ranks)]


ENVIRONMENTS = {
    "array 0-7": _slurm_array(0, 7),
    "array 0-7:2": _slurm_array(0, 7, 2),  # ids 0 2 4 6: the case that decoded inputs twice and others never
    "array 1-7:2": _slurm_array(1, 7, 2),
    "array 5-20:5": _slurm_array(5, 20, 5),
    "array 3-3": _slurm_array(3, 3),
    "torchrun 3": _within([{}], 3, ("RANK", "WORLD_SIZE")),
    "srun 4": _within([{"SLURM_NTASKS": "4"}], 4, ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")),
    "array 0-3 x srun 2": _within(_slurm_array(0, 3), 2, ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")),
    "array 2-8:3 x torchrun 4": _within(_slurm_array(2, 8, 3), 4, ("RANK", "WORLD_SIZE")),
}


@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_every_input_falls_to_exactly_one_process_in_every_scheduler_environment(name):
    items = list(range(23))
    taken = [i for env in ENVIRONMENTS[name] for i in take_shard(items, *shard_from_env(env))]
    assert sorted(taken) == items


@pytest.mark.parametrize("env, message", [
    ({"RANK": "8", "WORLD_SIZE": "8"}, "RANK=8 is outside 0..WORLD_SIZE-1"),
    ({"RANK": "-1", "WORLD_SIZE": "8"}, "outside"),
    ({"RANK": "1"}, "not WORLD_SIZE"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "31",  # --array=1,2,9,22,31
      "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_COUNT": "5"}, "not an evenly spaced range"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "not SLURM_ARRAY_TASK_COUNT"),
])
def test_scheduler_environments_that_cannot_be_mapped_are_refused(env, message):
    with pytest.raises(InputError, match=message):
        shard_from_env(env)


def test_a_plain_batch_script_is_not_mistaken_for_a_step_of_several_tasks():
    assert shard_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", **_slurm_array(0, 1)[1]}) == (1, 2)


# ---------------------------------------------------------------------------------------------------------
# Special files: a FIFO, a device or a link loop never hangs a run or reads without end.

def _fails_fast(fn, seconds: float = 20):
    """Run `fn` in a thread; fail the test (instead of hanging it) if it blocks. Returns fn's result."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    return box.get("result")


def test_fifos_and_devices_named_anywhere_are_refused_without_blocking(tiny, monkeypatch):
    fifo = tiny["root"] / "pipe.safetensors"
    os.mkfifo(fifo)
    (tiny["root"] / "zero.pt").symlink_to("/dev/zero")
    for named in (fifo, tiny["root"] / "zero.pt"):
        result, _ = _fails_fast(lambda n=named: _decode(tiny, n))
        assert result.exit_code == 2 and "not a regular file" in result.stderr
    result, _ = _fails_fast(lambda: _decode(tiny, _manifest(tiny, [{"input": str(fifo)}])))
    assert result.exit_code == 2 and "is not a regular file" in result.stderr
    result = _fails_fast(lambda: CliRunner().invoke(app, ["decode", "-", "--backbone", "flux", "--variant", "tiny",
                                                          "--registry", str(tiny["reg"]), "--out", str(tiny["out"])],
                                                    input=f"{fifo}\n"))
    assert result.exit_code == 2 and "not a regular file" in result.stderr
    _latent(tiny, "a.safetensors")
    os.mkfifo(tiny["in"] / "a.txt")  # a sidecar prompt that is a FIFO fails its own input, and blocks nothing
    os.mkfifo(tiny["in"] / "b.safetensors")  # a folder scan passes over a FIFO
    result, records = _fails_fast(lambda: CliRunner().invoke(app, [
        "decode", str(tiny["in"]), "--backbone", "flux", "--variant", "tiny", "--registry", str(tiny["reg"]),
        "--out", str(tiny["out"]), "--json", "--text-encoder", str(tiny["root"])]), 60), None
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["input"]).name for r in records] == ["a.safetensors"]
    assert records[0]["status"] == "failed" and "a.txt: the sidecar prompt is not a regular file" in records[0]["error"]
    prompt_fifo = tiny["root"] / "prompts.txt"
    os.mkfifo(prompt_fifo)
    result, _ = _fails_fast(lambda: _decode(tiny, extra=("--prompt-file", str(prompt_fifo))))
    assert result.exit_code == 2 and "prompts.txt: the prompt file is not a regular file" in result.stderr


def test_a_recursive_pattern_over_a_symlink_loop_returns(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "e" / "back").symlink_to(tmp_path / "d")
    save_file({"x": torch.zeros(1, 16, 2, 2)}, tmp_path / "d" / "e" / "a.safetensors")
    found = _fails_fast(lambda: collect_inputs([f"{tmp_path}/d/**/*.safetensors"]))
    assert [s.path.name for s in found] == ["a.safetensors"]
    found = _fails_fast(lambda: collect_inputs([str(tmp_path / "d")], recursive=True))
    assert [s.path.name for s in found] == ["a.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# Sizes from headers, before data is read.

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_sparse_latent_files_claiming_gigabytes_are_refused_before_reading(tmp_path):
    big = tmp_path / "big.npy"
    with open(big, "wb") as fh:  # a 4 GiB float32 array whose data are holes on disk
        fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", 118)
                 + "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16, 8192, 8192), }".ljust(117).encode()
                 + b"\n")
        fh.truncate(128 + 4 * 16 * 8192 * 8192)
    header = json.dumps({"latent": {"dtype": "F32", "shape": [1, 16, 8192, 8192],
                                    "data_offsets": [0, 4 * 16 * 8192 * 8192]}}).encode()
    sparse = tmp_path / "big.safetensors"
    with open(sparse, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + 4 * 16 * 8192 * 8192)
    before = _peak_rss_mb()
    for path in (big, sparse):
        with pytest.raises(LatentError, match=rf"{path.name}: tensor .* more than the {MAX_LATENT_BYTES}"):
            read_latent_file(path)
    assert _peak_rss_mb() - before < 200


def test_an_npz_of_thousands_of_members_reads_only_the_one_used(tmp_path, monkeypatch):
    path = tmp_path / "many.npz"
    arrays = {f"extra{i:04d}": np.zeros((64, 64), np.float32) for i in range(4000)}
    np.savez_compressed(path, latent=np.ones((1, 16, 2, 2), np.float32), **arrays)
    reads = []
    real = zipfile.ZipExtFile.read

    def counted(self, n=-1):
        reads.append(n)
        return real(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counted)
    z = read_latent_file(path).tensor
    assert torch.equal(z, torch.ones(1, 16, 2, 2))
    data_reads = [n for n in reads if n == 64 * 64 * 4]
    assert not data_reads  # only headers of the other members were read, never their 16 KiB of data


def test_a_huge_sparse_sidecar_prompt_fails_its_input_without_being_read(tiny):
    _latent(tiny, "a.safetensors")
    with open(tiny["in"] / "a.txt", "wb") as fh:
        fh.truncate(2 << 30)
    before = _peak_rss_mb()
    result = CliRunner().invoke(app, ["decode", str(tiny["in"]), "--backbone", "flux", "--variant", "tiny",
                                      "--registry", str(tiny["reg"]), "--out", str(tiny["out"]), "--json",
                                      "--text-encoder", str(tiny["root"])])
    record = json.loads(result.stdout.splitlines()[0])
    assert record["status"] == "failed" and "a.txt: the sidecar prompt holds 2147483648 bytes" in record["error"]
    assert _peak_rss_mb() - before < 200


# ---------------------------------------------------------------------------------------------------------
# Shared output folders: writes go into real folders inside --out only; only pid's own abandoned files are cleaned.

def test_a_subfolder_swapped_for_a_symlink_mid_run_never_sends_a_png_outside(tiny, monkeypatch):
    _latent(tiny, "a.safetensors")
    outside = tiny["root"] / "outside"
    outside.mkdir()
    fetch = session.Session.fetch_files

    def swap_then_fetch(session):  # after the prepass checked the path, before anything is written
        (tiny["out"] / "sub").rmdir()
        (tiny["out"] / "sub").symlink_to(outside)
        return fetch(session)

    (tiny["out"] / "sub").mkdir(parents=True)
    monkeypatch.setattr(session.Session, "fetch_files", swap_then_fetch)
    result, records = _decode(tiny, extra=("--name", "sub/{stem}.png"))
    assert result.exit_code == 1 and records[0]["status"] == "failed"
    assert "'sub'" in records[0]["error"] and "is a symlink or not a folder" in records[0]["error"]
    assert list(outside.iterdir()) == []


def test_cleaning_leaves_other_programs_hidden_files_alone(tmp_path):
    theirs = [tmp_path / ".a.png.part", tmp_path / ".download.part", tmp_path / ".pid-notours.part"]
    for p in theirs:
        p.write_bytes(b"someone else's")
    ours = tmp_path / "sub" / outputs.partial_name("a.png")
    ours.parent.mkdir()
    ours.write_bytes(b"abandoned")
    assert outputs.clean_partials(tmp_path) == 1 and not ours.exists() and all(p.exists() for p in theirs)


# ---------------------------------------------------------------------------------------------------------
# Low: one input's trouble stays its own; limits checked before the GPU; nothing of the user's overwritten.

@pytest.mark.parametrize("change", ["vanish", "reshape"])
def test_an_input_that_vanishes_or_changes_mid_run_fails_alone(tiny, monkeypatch, change):
    for i in range(3):
        _latent(tiny, f"{i}.safetensors", i)
    fetch = session.Session.fetch_files

    def change_then_fetch(session):
        victim = tiny["in"] / "1.safetensors"
        if change == "vanish":
            victim.unlink()
        else:
            save_file({"latent": torch.randn(1, 16, 4, 4)}, victim)
        return fetch(session)

    monkeypatch.setattr(session.Session, "fetch_files", change_then_fetch)
    result, records = _decode(tiny, extra=("--batch-size", "3"))
    status = {Path(r["input"]).name: r for r in records}
    assert result.exit_code == 1 and status["1.safetensors"]["status"] == "failed"
    assert status["0.safetensors"]["status"] == status["2.safetensors"]["status"] == "ok"
    assert "1.safetensors" in status["1.safetensors"]["error"]


def test_output_names_up_to_the_file_systems_limit_work_and_longer_ones_fail_before_decoding(tiny, monkeypatch):
    _latent(tiny, "a.safetensors")
    decoded = []
    monkeypatch.setattr(session.Session, "decode_all", lambda s: decoded.append(len(s.items)) or None)
    result, records = _decode(tiny, _manifest(tiny, [{"input": "in/a.safetensors", "output": "n" * 251 + ".png"}]))
    assert decoded == [1]  # 255 bytes, the most a name may have here: planned
    result, records = _decode(tiny, _manifest(tiny, [{"input": "in/a.safetensors", "output": "n" * 252 + ".png"}]))
    assert result.exit_code == 1 and "is 256 bytes, more than the 255 this file system allows" in records[0]["error"]
    assert decoded == [1]  # nothing decoded for it
    monkeypatch.undo()
    result, records = _decode(tiny, _manifest(tiny, [{"input": "in/a.safetensors", "output": "n" * 251 + ".png"}]))
    assert result.exit_code == 0 and (tiny["out"] / ("n" * 251 + ".png")).is_file()


def test_records_are_never_appended_to_an_input(tiny):
    path = _latent(tiny, "a.safetensors")
    before = path.read_bytes()
    result, _ = _decode(tiny, extra=("--manifest-out", str(path)))
    assert result.exit_code == 2 and "would corrupt it" in result.stderr and path.read_bytes() == before


def test_a_signal_in_the_first_moment_still_leaves_a_record_per_input(tiny, monkeypatch):
    for i in range(3):
        _latent(tiny, f"{i}.safetensors", i)
    collect = session.collect_job_inputs

    def interrupted_while_collecting(job):
        os.kill(os.getpid(), signal.SIGINT)  # the handler is already in place: it asks the run to stop
        time.sleep(0.05)
        return collect(job)

    monkeypatch.setattr(session, "collect_job_inputs", interrupted_while_collecting)
    records_file = tiny["root"] / "records.jsonl"
    result, _ = _decode(tiny, extra=("--manifest-out", str(records_file)))
    assert result.exit_code == 130
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert len(records) == 3 and {r["status"] for r in records} == {"failed"}


def test_a_nan_sigma_in_metadata_names_the_file(tiny):
    save_file({"latent": torch.randn(1, 16, 2, 2)}, tiny["in"] / "nan.safetensors", metadata={"degrade_sigma": "nan"})
    result, records = _decode(tiny)
    assert result.exit_code == 1 and records[0]["error"].startswith(str(tiny["in"] / "nan.safetensors"))
    assert "degrade_sigma from metadata is 'nan'" in records[0]["error"]


def test_the_prepass_holds_no_more_than_its_memory_budget_at_once(tiny, monkeypatch):
    for i in range(6):
        _latent(tiny, f"{i}.safetensors", i)
    cost = plan.probe_cost(plan.InputSpec(tiny["in"] / "0.safetensors"))
    monkeypatch.setattr(session, "PREPASS_MEMORY", 2 * cost + cost // 2)  # room for two inputs at a time
    probe, active, peak = session.probe_input, [0], [0]
    lock = threading.Lock()

    def counted(job, spec):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return probe(job, spec)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(session, "probe_input", counted)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # eight prepass threads, as on a farm node
    result, records = _decode(tiny)
    assert result.exit_code == 0 and len(records) == 6 and peak[0] == 2
