"""Input discovery, sharding, output names and atomic PNG writes."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pid_cli.inputs.collection import (
    InputError,
    InputSpec,
    check_template,
    collect_inputs,
    output_names,
    parse_shard,
    read_manifest,
    safe_output_path,
    shard_from_env,
    take_shard,
)
from pid_cli.outputs import OutputExists, check_writable, encode_png, write_atomic


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_folders_globs_stdin_and_manifests(tmp_path):
    a = _touch(tmp_path / "in" / "a.safetensors")
    b = _touch(tmp_path / "in" / "sub" / "b.npy")
    _touch(tmp_path / "in" / "notes.md")
    flat = collect_inputs([str(tmp_path / "in")])
    assert [s.path for s in flat] == [a]
    deep = collect_inputs([str(tmp_path / "in")], recursive=True)
    assert [(s.path, s.rel_dir) for s in deep] == [(a, ""), (b, "sub")]
    assert [s.path for s in collect_inputs([str(tmp_path / "in" / "**" / "*.npy")])] == [b]
    assert [s.path for s in collect_inputs(["-"], stdin=io.StringIO(f"{a}\n\n{b}\n"))] == [a, b]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"input": "in/a.safetensors", "prompt": "cat", "degrade_sigma": 0.2}) + "\n")
    (spec,) = collect_inputs([str(manifest), str(a)])  # the manifest's settings win for the same file
    assert (spec.path, spec.prompt, spec.degrade_sigma) == (a, "cat", (0.2,))


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    ('{"prompt": "x"}', 'string "input" field'),
    ('{"input": "missing.pt"}', "does not exist"),
    ('{"input": "a.pt", "degrade_sigma": "high"}', "must be a number"),
    ('{"input": "a.pt", "colour": 1}', "unknown field"),
])
def test_manifest_errors_name_the_line(tmp_path, line, message):
    _touch(tmp_path / "a.pt")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(line + "\n")
    with pytest.raises(InputError, match=message) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value)


def test_missing_inputs_are_usage_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        collect_inputs([str(tmp_path / "nope.pt")])
    with pytest.raises(InputError, match="matches no files"):
        collect_inputs([str(tmp_path / "*.pt")])


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_partition_the_inputs(n):
    items = [InputSpec(path=__import__("pathlib").Path(f"/x/{i:03d}.pt")) for i in range(20)]
    shards = [take_shard(items, k, n) for k in range(n)]
    flat = [s for shard in shards for s in shard]
    assert sorted(flat, key=lambda s: s.path) == items  # every input exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_sources():
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(InputError):
        parse_shard("4/4")
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "8"}) == (1, 8)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "10",
                           "SLURM_ARRAY_TASK_STEP": "1", "SLURM_ARRAY_TASK_COUNT": "10"}) == (4, 10)
    assert shard_from_env({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}) == (3, 4)
    assert shard_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None  # the batch script itself: no step
    assert shard_from_env({}) is None


def test_output_names(tmp_path):
    spec = InputSpec(tmp_path / "cat.safetensors", rel_dir="sub")
    assert output_names(spec, 1, "{dir}/{stem}.png") == ["sub/cat.png"]
    assert output_names(spec, 2, "{dir}/{stem}.png") == ["sub/cat_0.png", "sub/cat_1.png"]
    assert output_names(InputSpec(tmp_path / "cat.pt"), 1, "{dir}/{stem}.png") == ["cat.png"]
    assert output_names(spec, 2, "{stem}-{index:03d}.png") == ["cat-000.png", "cat-001.png"]
    assert output_names(InputSpec(tmp_path / "x.pt", output="o/x.png"), 2, "{stem}.png") == ["o/x_0.png",
                                                                                               "o/x_1.png"]
    with pytest.raises(InputError, match="unknown field"):
        check_template("{stem}{colour}.png")


@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd.png", "a/../../b.png"])
def test_output_names_cannot_escape(tmp_path, name):
    with pytest.raises(InputError, match="output"):
        safe_output_path(tmp_path, name, "manifest line 1")


def test_symlinked_output_folder_cannot_escape(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="leaves the output folder"):
        safe_output_path(tmp_path / "out", "link/x.png", "manifest")


def _png_chunks(data: bytes) -> dict[bytes, list[bytes]]:
    chunks: dict[bytes, list[bytes]] = {}
    pos = 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.setdefault(data[pos + 4:pos + 8], []).append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    return chunks


def test_png_8_and_16_bit_round_trip_with_metadata():
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = Image.open(io.BytesIO(encode_png(img8, {"pid:prompt": "a café"})))
    assert np.array_equal(np.asarray(png), img8) and png.info["pid:prompt"] == "a café"
    img16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    chunks = _png_chunks(encode_png(img16, {"k": "v"}))
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    assert (width, height, depth, colour) == (7, 5, 16, 2)
    rows = np.frombuffer(zlib.decompress(b"".join(chunks[b"IDAT"])), np.uint8).reshape(5, 1 + 7 * 6)
    assert np.array_equal(rows[:, 1:].copy().view(">u2").reshape(5, 7, 3), img16)
    assert Image.open(io.BytesIO(encode_png(img16))).size == (7, 5)  # a valid PNG for other readers too


def test_outputs_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    target = tmp_path / "x.png"
    write_atomic(target, b"data")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600


def test_atomic_write_never_clobbers_and_leaves_no_partials(tmp_path):
    target = tmp_path / "a" / "x.png"
    write_atomic(target, b"first")
    with pytest.raises(OutputExists):
        write_atomic(target, b"second")
    assert target.read_bytes() == b"first"
    write_atomic(target, b"third", overwrite=True)
    assert target.read_bytes() == b"third"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]


def test_unwritable_output_folder_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable(blocker / "out")
