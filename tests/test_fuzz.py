"""Fuzzing the loaders that read what users hand us: latent files, manifests, registries, images, output names.

Every case must end in a value that is safe to use or in the loader's own clean error that names the file —
never another exception (a traceback in the CLI), a hang, or an allocation the file does not back with data.
Hostile-file builders here are shared with tests/test_faults.py and scripts/soak.py.

Case counts are kept small for CI (derandomised, reproducible). For a long hand run:
    PID_FUZZ_SCALE=50 python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    check_latent,
    clean_error,
    hostile_latents,
    lie_about_zip_sizes,
    npy_bytes,
    npz_bytes,
    safetensors_bytes,
    time_limit,
    torch_zip_bytes,
)
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

from pid_cli.inputs.collection import InputError, check_template, output_names, read_manifest, safe_output_path
from pid_cli.inputs.images import ImageReadError, read_image
from pid_cli.inputs.latent_files import FORMATS
from pid_cli.inputs.prompts import PromptSourceError
from pid_cli.inputs.prompts import read_manifest as read_prompt_manifest
from pid_cli.registry import RegistryError, load_registry

SCALE = int(os.environ.get("PID_FUZZ_SCALE", "1"))


def fuzz(n: int):
    """Hypothesis settings: n cases in CI (the same ones every run), n × PID_FUZZ_SCALE random ones by hand."""
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=list(HealthCheck), phases=[p for p in Phase if p != Phase.explain])


# ---------------------------------------------------------------------------------------------------------
# Hostile-file builders (also used by test_faults.py and scripts/soak.py)


# ---------------------------------------------------------------------------------------------------------
# Latent files


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """Up to four edits of a valid file: truncation, bit flips, inserted/deleted bytes, a planted integer."""
    data = bytearray(data)
    if not draw(st.booleans()):  # about half the cases keep the file intact
        return bytes(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "int"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "int" and len(data) >= at + 8:
            planted = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]))
            data[at:at + 8] = struct.pack("<Q", planted)
    return bytes(data)


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ANY_DTYPES = [*FLOAT_DTYPES, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
META_VALUES = st.one_of(st.text(max_size=20), st.sampled_from(
    ["nan", "inf", "-inf", "-16", "0", "1e400", "16", "32", "0.5", "1", "2", "99999999999999999999", "9" * 5000]))


@st.composite
def tensors(draw, dtypes=ANY_DTYPES) -> torch.Tensor:
    if not draw(st.booleans()):  # a good latent about half the time, so both paths get exercised
        shape = draw(st.sampled_from([(16, 2, 2), (1, 16, 2, 3), (2, 16, 2, 2), (1, 16, 1, 2, 2)]))
        seed = draw(st.integers(0, 99))
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(
            draw(st.sampled_from([d for d in FLOAT_DTYPES if d in dtypes])))
    valid = [(16, 2, 2), (1, 16, 2, 3), (2, 16, 2, 2), (1, 16, 1, 2, 2), (1, 1, 64)]
    shape = draw(st.sampled_from(valid + valid + [(1, 4, 64), (16, 0, 2), (4, 2, 2), (16,), (), (1, 16, 2000, 1)]))
    dtype = draw(st.sampled_from(dtypes[:4] * 2 + dtypes[4:]))
    kind = draw(st.sampled_from(["randn"] * 5 + ["nan", "inf", "huge", "zeros"]))
    t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    if kind == "nan" and t.numel():
        t.view(-1)[0] = float("nan")
    elif kind == "inf" and t.numel():
        t.view(-1)[-1] = float("inf")
    elif kind == "huge":
        t = t * 1e30
    elif kind == "zeros":
        t = torch.zeros(shape)
    return t.to(dtype) if dtype.is_floating_point or dtype.is_complex else t.clamp(-50, 50).to(dtype)


@st.composite
def safetensors_files(draw) -> bytes:
    if draw(st.integers(0, 2)) < 2:  # a real file, perhaps damaged
        tensors_ = {draw(st.sampled_from(["latent", "x", "samples", "other"])): draw(tensors())}
        if draw(st.integers(0, 3)) == 0:
            tensors_["extra"] = draw(tensors())
        meta = draw(st.dictionaries(st.sampled_from(["prompt", "height", "width", "latent_height", "latent_width",
                                                     "degrade_sigma", "latent_format_version_0"]), META_VALUES,
                                    max_size=4))
        return draw(mutations(st_save(tensors_, metadata=meta or None)))
    # a crafted header: any dtype, shape (huge too) and offsets, with or without the bytes behind them
    dtype = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "C64", "F4", "?"]))
    shape = draw(st.lists(st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**32, 2**40, 2**63, 2**64 - 1])),
                          max_size=5))
    length = draw(st.one_of(st.integers(0, 512), st.sampled_from([2**32, 2**63])))
    start = draw(st.integers(0, 64))
    header: dict = {"x": {"dtype": dtype, "shape": shape, "data_offsets": [start, start + length]}}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.one_of(
            META_VALUES, st.integers(), st.lists(st.integers(), max_size=2)), max_size=3))
    payload = bytes(draw(st.integers(0, 600)))
    data = safetensors_bytes(header, payload)
    if draw(st.booleans()):  # invalid UTF-8 inside the header
        at = draw(st.integers(8, len(data) - 1))
        data = data[:at] + b"\xff" + data[at + 1:]
    return data


@fuzz(250)
@given(data=safetensors_files(), suffix=st.sampled_from([".safetensors", ".safetensors", ".latent"]),
       fmt=st.sampled_from(["auto"] * 4 + list(FORMATS)), size=st.sampled_from([None] * 4 + [(4, 4), (2, 2), (0, 5)]))
def test_fuzz_safetensors_latents(tmp_path_factory, data, suffix, fmt, size):
    path = tmp_path_factory.mktemp("st") / f"case{suffix}"
    path.write_bytes(data)
    check_latent(path, fmt, size if size != (0, 5) else None)


@st.composite
def torch_files(draw) -> bytes:
    choice = draw(st.sampled_from(["save", "save", "craft", "craft", "legacy", "nested"]))
    if choice == "craft":  # storages and views of any size
        numel = draw(st.sampled_from([0, 1, 16, 64, 2**20, 2**31, 2**40]))
        size = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 16, 2**20, 2**31]), min_size=1, max_size=4)))
        stride = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 4, 2**20]), min_size=len(size), max_size=len(size))))
        data = bytes(draw(st.sampled_from([0, 4, 64, 256])))
        storage = draw(st.sampled_from([torch.FloatStorage, torch.HalfStorage, torch.BFloat16Storage,
                                        torch.DoubleStorage, torch.LongStorage, torch.ByteStorage]))
        compress = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
        raw = torch_zip_bytes(numel, size, stride, data, draw(st.sampled_from([0, 1, 2**40])), storage, compress)
        if draw(st.booleans()):
            raw = lie_about_zip_sizes(raw, draw(st.sampled_from([2, 1 << 10, 1 << 20])))
        return draw(mutations(raw))
    buf = io.BytesIO()
    value: object = draw(tensors())
    if choice == "nested":
        value = {draw(st.sampled_from(["latent", "x", 0, ("a", "b")])): value, "prompt": draw(META_VALUES),
                 "height": draw(st.one_of(st.integers(), st.floats(), META_VALUES)), "list": [value]}
    elif draw(st.booleans()):
        value = {"latents": value, "prompt": "p"}
    torch.save(value, buf, _use_new_zipfile_serialization=choice != "legacy")
    return draw(mutations(buf.getvalue()))


@fuzz(150)
@given(data=torch_files(), suffix=st.sampled_from([".pt", ".pth"]))
def test_fuzz_torch_latents(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("pt") / f"case{suffix}"
    path.write_bytes(data)
    check_latent(path)


@st.composite
def numpy_files(draw) -> tuple[str, bytes]:
    descr = st.sampled_from(["<f4", ">f4", "<f2", "<f8", "<f16", "<i4", "|b1", "|O", "<c8", "|V8", "<U3", "bogus"])
    shape = st.one_of(
        st.tuples(*[st.integers(0, 4)] * 3).map(lambda s: (16, *s[1:])),
        st.lists(st.one_of(st.integers(-2, 20), st.sampled_from([2**31, 2**40, 2**62, 2**64])), max_size=5)
        .map(tuple), st.sampled_from(["(16, 2, 2)", "None", "[16, 2, 2]", "(1.5,)"]))
    arrays = {}
    for i in range(draw(st.integers(1, 3))):
        if not draw(st.booleans()):  # a real array
            buf = io.BytesIO()
            t = draw(tensors([torch.float32, torch.float16, torch.float64, torch.int32]))
            np.save(buf, t.numpy() if draw(st.booleans()) else np.asfortranarray(t.numpy()))
            raw = buf.getvalue()
        else:
            declared = draw(shape)
            raw = npy_bytes(draw(descr), declared, bytes(draw(st.integers(0, 300))), draw(st.booleans()),
                            draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)])))
        arrays[draw(st.sampled_from(["latent", "samples", f"a{i}"]))] = raw
    if draw(st.booleans()):
        return ".npy", draw(mutations(next(iter(arrays.values()))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as z:
        for name, raw in arrays.items():
            z.writestr(f"{name}.npy", raw)
    raw = out.getvalue()
    if draw(st.booleans()):
        raw = lie_about_zip_sizes(raw, draw(st.sampled_from([2, 1 << 12, 1 << 24])))
    return ".npz", draw(mutations(raw))


@fuzz(150)
@given(case=numpy_files())
def test_fuzz_numpy_latents(tmp_path_factory, case):
    suffix, data = case
    path = tmp_path_factory.mktemp("np") / f"case{suffix}"
    path.write_bytes(data)
    check_latent(path)


def test_hostile_latents_are_refused_without_allocating(tmp_path):
    """Each hostile file in a fresh process whose address space allows only 1 GiB more than it uses after
    importing: any attempt to allocate what a header merely claims fails there and would show up as a
    MemoryError / "cannot allocate" in the message (or as an uncaught exception)."""
    hostile_latents(tmp_path)
    script = f"""
import json, resource, sys
from pathlib import Path
import numpy, torch, safetensors
from pid_cli.inputs.latent_files import LatentError, read_latent_file, to_pid_latent
from pid_cli.registry import Latent
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
spec = Latent(channels=16, vae_factor=8, normalisation={{"kind": "affine", "shift": 0.1159, "scale": 0.3611}})
out = {{}}
for p in sorted(Path({str(tmp_path)!r}).iterdir()):
    try:
        to_pid_latent(read_latent_file(p), spec, "flux")
        out[p.name] = "accepted"
    except LatentError as e:
        out[p.name] = str(e)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == 21
    for name, message in results.items():
        assert message != "accepted", name
        assert "MemoryError" not in message and "allocate" not in message, (name, message)
    assert not (tmp_path / "PWNED").exists()
    assert "not a PyTorch zip archive" in results["legacy.pt"] and "not a plain dense tensor" in results["stride0.pt"]
    assert "header declares shape" in results["huge.npy"] and "claims" in results["lying.npz"]
    assert "larger than" in results["overflow.safetensors"] or "reach" in results["overflow.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# Manifests (decode inputs and prompt files)

JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
NAMES = st.one_of(st.text(max_size=30), st.sampled_from([
    "a.png", "../escape.png", "/etc/passwd.png", "a/../../b.png", ".", "", "sub/", ".png", "x.PNG", "x.jpg",
    "link/x.png", "inner/x.png", "a\x00b.png", "~/x.png", "x" * 300 + ".png", "sub/./../ok.png", "..\\x.png",
    "\udcff.png", "inner/../../out2/x.png"]))


@st.composite
def manifest_lines(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["row", "row", "row", "json", "text", "bytes", "deep", "bigint"]))
        if kind == "row":
            row = {"input": draw(st.sampled_from(["good.safetensors", "missing.pt", "", "a\x00b", "sub",
                                                  "x" * 5000, "~nobody_here/x.pt"]))}
            for key, values in (("prompt", st.one_of(st.text(max_size=20), JSON_VALUES)),
                                ("degrade_sigma", st.one_of(st.floats(), st.integers(), st.booleans(),
                                                            st.sampled_from([10**400, "0.5", None]))),
                                ("output", st.one_of(NAMES, JSON_VALUES)), ("extra", JSON_VALUES)):
                if draw(st.booleans()):
                    row[key] = draw(values)
            try:
                lines.append(json.dumps(row).encode("utf-8", "surrogatepass"))
            except ValueError:  # 10**400 > the digit limit of int → str
                lines.append(b'{"input": "good.safetensors", "degrade_sigma": 1' + b"0" * 400 + b"}")
        elif kind == "json":
            lines.append(json.dumps(draw(JSON_VALUES)).encode())
        elif kind == "text":
            lines.append(draw(st.text(max_size=40)).encode("utf-8", "surrogatepass"))
        elif kind == "bytes":
            lines.append(draw(st.binary(max_size=40)))
        elif kind == "deep":
            lines.append(b"[" * 100_000)
        else:
            lines.append(b'{"input": "good.safetensors", "degrade_sigma": ' + b"9" * 5000 + b"}")
    return b"\n".join(lines)


@pytest.fixture(scope="module")
def out_tree(tmp_path_factory):
    """A manifest folder with one real input, and an output folder holding an escaping and an inner symlink."""
    root = tmp_path_factory.mktemp("tree")
    (root / "good.safetensors").write_bytes(st_save({"x": torch.zeros(16, 2, 2)}))
    (root / "sub").mkdir()
    out = root / "out"
    out.mkdir()
    (root / "elsewhere").mkdir()
    (out / "link").symlink_to(root / "elsewhere")
    (out / "real").mkdir()
    (out / "inner").symlink_to(out / "real")
    return root


def check_output(out: Path, name: str) -> None:
    """safe_output_path: a .png strictly inside the output folder (symlinks resolved), or an InputError."""
    try:
        path = safe_output_path(out, name, "fuzz")
    except InputError as e:
        assert "fuzz" in str(e)
        return
    resolved = path.resolve()
    assert out.resolve() in resolved.parents and resolved.name.lower().endswith(".png"), (name, resolved)


@fuzz(200)
@given(data=manifest_lines())
def test_fuzz_manifests(out_tree, data):
    path = out_tree / "m.jsonl"
    path.write_bytes(data)
    with time_limit():
        try:
            specs = read_manifest(path)
        except InputError as e:
            assert str(path) in str(e)
            specs = []
        for spec in specs:
            assert spec.path.is_file()
            sigmas = spec.degrade_sigma or (0.0,)
            assert sigmas and all(0 <= s < math.inf for s in sigmas)
            for name in output_names(spec, 2, "{dir}/{stem}.png", sigmas):
                check_output(out_tree / "out", name)
        try:
            entries = read_prompt_manifest(path)
        except PromptSourceError as e:
            assert str(path) in str(e)
            entries = []
        assert all(e.prompt is None or isinstance(e.prompt, str) for e in entries)


@fuzz(300)
@given(name=NAMES)
def test_fuzz_output_names_stay_inside_out(out_tree, name):
    check_output(out_tree / "out", name)


@fuzz(150)
@given(template=st.one_of(st.text(max_size=30), st.sampled_from([
    "{stem:>1000000000}.png", "{stem:{index}}.png", "{index:s}.png", "{stem.__class__}.png", "{stem[0]}.png",
    "{dir}/../{stem}.png", "{}.png", "{0}.png", "{stem!r}.png", "{index:099999999999d}.png", "/abs/{stem}.png",
    "{dir}/{stem}.png", "{stem}-{index:03d}.png"])), stem=st.text(min_size=1, max_size=20))
def test_fuzz_name_templates(out_tree, template, stem):
    from pid_cli.inputs.collection import InputSpec

    with time_limit():
        try:
            check_template(template)
        except InputError:
            return
        assume("/" not in stem and stem not in (".", ".."))
        for name in output_names(InputSpec(out_tree / f"{stem}.pt"), 2, template):
            check_output(out_tree / "out", name)


# ---------------------------------------------------------------------------------------------------------
# Registries

BASE_ENTRY = {"id": "mine", "backbone": "flux", "variant": "v", "path": "/nonexistent/w.safetensors",
              "net_config": {"lq_latent_channels": 16, "sr_scale": 4, "latent_spatial_down_factor": 8},
              "latent": {"channels": 16, "vae_factor": 8, "normalisation": {"kind": "affine", "shift": 0.1,
                                                                              "scale": 0.3}},
              "sampler": {"type": "sde", "t_list": [1.0, 0.5, 0]}, "sr_scale": 4,
              "output_sizes": {"buckets": ["64x64"]}, "vae": {"format": "x", "files": {"w": {"path": "a"}}}}
BOMB = ("shared:\n  b0: &b0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"  # 9^9 values once expanded
        + "".join(f"  b{i + 1}: &b{i + 1} [{', '.join([f'*b{i}'] * 9)}]\n" for i in range(8)))


@st.composite
def registry_texts(draw) -> bytes:
    entries = [dict(BASE_ENTRY)]
    for i in range(draw(st.integers(0, 2))):
        entry = {"id": f"e{i}", "base": draw(st.sampled_from(["mine", "mine", "nope", f"e{i}"])),
                 "variant": draw(st.sampled_from([f"w{i}", "v", "2K_V1PT5", ""]))}
        for _ in range(draw(st.integers(0, 3))):
            key = draw(st.sampled_from([*BASE_ENTRY, "hub", "answers_to", "superseded", "licence", "text_encoder",
                                        "tensor_bytes", "bogus"]))
            entry[key] = draw(st.one_of(JSON_VALUES, st.sampled_from([
                {"repo": "a/b", "path": "../x"}, {"repo": "nope", "path": "x"}, {"kind": "per_channel"},
                {"channels": 10**30, "vae_factor": 8}, {"type": "sde", "t_list": [float("nan"), 0]}, [], "64x64"])))
        entries.append(entry)
    top = {"version": draw(st.sampled_from([1, 1, 1, 2, "1", None])), "entries": entries,
           "aliases": draw(st.sampled_from([{}, {"fx": "flux"}, {"flux": "flux"}, {"a": 1}, []]))}
    text = yaml.safe_dump(top, allow_unicode=True)
    tweak = draw(st.sampled_from(["none", "none", "bomb", "cycle", "deep", "bytes", "tag", "bigint", "mutate"]))
    if tweak == "bomb":  # where nothing validates the contents, so only an expansion limit stops a walk
        where = draw(st.sampled_from(["normalisation", "options", "net_config"]))
        entry = json.loads(json.dumps(BASE_ENTRY))
        {"normalisation": entry["latent"]["normalisation"], "options": entry["vae"].setdefault("options", {}),
         "net_config": entry["net_config"]}[where]["junk"] = "BOMB_HERE"
        later = {"id": "later", "base": "mine", "variant": "later"}  # base: walks the inherited fields
        text = BOMB + yaml.safe_dump({**top, "entries": [entry, later]}).replace("BOMB_HERE", "*b8")
    elif tweak == "cycle":
        text = "shared: &c {x: *c}\n" + text
    elif tweak == "deep":
        text = "entries:\n" + "- " * 3000 + "x\n"  # nested block sequences (flow [[[ parses far slower)
    elif tweak == "tag":
        text = "entries: !!python/object/apply:os.system ['touch /tmp/pid_registry_pwned']\n"
    elif tweak == "bigint":
        text = text.replace("sr_scale: 4\n", "sr_scale: " + "9" * 5000 + "\n", 1)
    data = text.encode("utf-8", "surrogatepass")
    if tweak == "bytes":
        data = data + b"\n# \xff\xfe\n"
    elif tweak == "mutate":
        data = draw(mutations(data))
    return data


@fuzz(150)
@given(data=registry_texts())
def test_fuzz_registries(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("reg") / "r.yaml"
    path.write_bytes(data)
    with time_limit():
        try:
            reg = load_registry([path], builtin=False, use_env=False)
        except RegistryError as e:
            assert str(path) in str(e) or "alias" in str(e) or "no registry entries" in str(e), str(e)
            return
        for entry in reg.entries:  # what a command would do with a loaded registry
            assert reg.resolve(entry.backbone, entry.variant) is not None
            json.dumps(entry.net_config, sort_keys=True)
        reg.describe_pairs()
    assert not os.path.exists("/tmp/pid_registry_pwned")


# ---------------------------------------------------------------------------------------------------------
# Images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@st.composite
def image_files(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(["PNG", "PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PNG16", "IHDR"]))
    w, h = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    if fmt == "IHDR":  # a PNG whose header declares any size, with valid CRCs and a tiny (or no) IDAT
        w, h = draw(st.sampled_from([(0, 1), (1 << 31, 1), (70_000, 70_000), (12_000, 9_000), (5, 5)]))
        depth, colour = draw(st.sampled_from([(8, 2), (16, 2), (8, 6), (1, 0), (16, 0), (8, 3), (7, 2)]))
        idat = zlib.compress(bytes(draw(st.integers(0, 200))))
        data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
                + (_png_chunk(b"IDAT", idat) if draw(st.booleans()) else b"") + _png_chunk(b"IEND", b""))
        return ".png", data
    buf = io.BytesIO()
    if fmt == "PNG16":
        arr = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
        import cv2

        ok, enc = cv2.imencode(".png", arr)
        assert ok
        buf.write(enc.tobytes())
        fmt = "PNG"
    else:
        mode = draw(st.sampled_from(["RGB", "RGBA", "L", "P", "1", "I;16", "CMYK", "LA"]))
        if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK"):
            mode = "RGB"
        if fmt in ("BMP", "GIF", "WEBP") and mode in ("I;16", "CMYK", "LA"):
            mode = "RGB"
        rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        exif = Image.Exif()
        exif[0x0112] = draw(st.sampled_from([0, 1, 3, 6, 8, 9, 65535]))
        extra = {"exif": exif} if draw(st.booleans()) and fmt in ("JPEG", "PNG", "WEBP", "TIFF") else {}
        try:
            (rgba.convert("L").convert(mode) if mode == "I;16" else rgba.convert(mode)).save(buf, fmt, **extra)
        except (OSError, ValueError, KeyError):  # a mode this format cannot store
            buf = io.BytesIO()
            rgba.convert("RGB").save(buf, fmt)
    suffix = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".png"}[fmt]
    return suffix, draw(mutations(buf.getvalue()))


@fuzz(200)
@given(case=image_files())
def test_fuzz_images(tmp_path_factory, case):
    suffix, data = case
    path = tmp_path_factory.mktemp("img") / f"case{suffix}"
    path.write_bytes(data)
    with time_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF, truncated data, large images
        try:
            arr, info = read_image(path)
        except ImageReadError as e:
            clean_error(e, path)
            return
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype in (np.uint8, np.uint16) and arr.size > 0
    assert (info.width, info.height) == (arr.shape[1], arr.shape[0])


def test_tiny_file_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    """Found by atheris: a 300-byte raw TIFF whose header says 5 x 16.7M pixels made Pillow allocate (and zero)
    250 MB, then "decode" a mostly black image without complaint."""
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 5, 3), 200, np.uint8)).save(buf, "TIFF")
    entry = b"\x01\x01\x04\x00\x01\x00\x00\x00" + struct.pack("<I", 4)  # ImageLength (257), LONG, 1 value: 4
    data = buf.getvalue()
    assert data.count(entry) == 1
    (tmp_path / "tall.tif").write_bytes(data.replace(entry, entry[:8] + struct.pack("<I", 16_711_684)))
    with pytest.raises(ImageReadError, match="declares 5x16711684 pixels"):
        read_image(tmp_path / "tall.tif")


# ---------------------------------------------------------------------------------------------------------
# Coverage-guided fuzzing by hand with atheris (optional: pip install atheris):
#     python tests/test_fuzz.py latents -runs=50000 -rss_limit_mb=3000 -timeout=20
# Targets: latents, manifests, registries, images. libFuzzer stops at the first exception that is not the
# loader's own error, at a case over -timeout seconds, and when memory use passes -rss_limit_mb.

LATENT_KINDS = (".safetensors", ".latent", ".pt", ".npy", ".npz")
IMAGE_KINDS = (".png", ".jpg", ".webp", ".tif", ".bmp")


def _seed_corpus(target: str, folder: Path) -> None:
    """Valid files of each kind (the first byte picks the suffix), for libFuzzer to mutate."""
    folder.mkdir(parents=True, exist_ok=True)
    z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))
    seeds: list[bytes] = []
    if target == "latents":
        buf = io.BytesIO()
        torch.save({"latents": z}, buf)
        npy = io.BytesIO()
        np.save(npy, z.numpy())
        seeds = [bytes([0]) + st_save({"latent": z}, metadata={"prompt": "p", "height": "16", "width": "24"}),
                 bytes([1]) + st_save({"latent_tensor": z}, metadata={"latent_format_version_0": "true"}),
                 bytes([2]) + buf.getvalue(), bytes([3]) + npy.getvalue(),
                 bytes([4]) + npz_bytes({"samples": z.numpy()}, zipfile.ZIP_DEFLATED)]
    elif target == "manifests":
        seeds = [b'{"input": "good.safetensors", "prompt": "a", "degrade_sigma": 0.5, "output": "x/y.png"}\n']
    elif target == "registries":
        seeds = [yaml.safe_dump({"version": 1, "entries": [BASE_ENTRY, {"id": "e", "base": "mine", "variant": "w"}]})
                 .encode()]
    elif target == "images":
        for k, fmt in enumerate(["PNG", "JPEG", "WEBP", "TIFF", "BMP"]):
            buf = io.BytesIO()
            Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)).save(buf, fmt)
            seeds.append(bytes([k]) + buf.getvalue())
    for i, data in enumerate(seeds):
        (folder / f"seed{i}").write_bytes(data)


def _atheris_main(target: str, argv: list[str]) -> None:
    import tempfile

    import atheris

    work = Path(tempfile.mkdtemp(prefix=f"pid-atheris-{target}-"))
    (work / "good.safetensors").write_bytes(st_save({"x": torch.zeros(16, 2, 2)}))
    (work / "out").mkdir()
    corpus = work / "corpus"
    _seed_corpus(target, corpus)
    runs = [0]

    def one(data: bytes) -> None:
        runs[0] += 1
        if target in ("latents", "images"):
            kinds = LATENT_KINDS if target == "latents" else IMAGE_KINDS
            path = work / f"case{kinds[data[0] % len(kinds)] if data else kinds[0]}"
            path.write_bytes(data[1:])
            if target == "latents":
                check_latent(path)
                return
            with time_limit(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    read_image(path)
                except ImageReadError as e:
                    clean_error(e, path)
            return
        path = work / ("m.jsonl" if target == "manifests" else "r.yaml")
        path.write_bytes(data)
        with time_limit():
            if target == "manifests":
                try:
                    for spec in read_manifest(path):
                        for name in output_names(spec, 2, "{dir}/{stem}.png"):
                            check_output(work / "out", name)
                except InputError:
                    pass
                with contextlib.suppress(PromptSourceError):
                    read_prompt_manifest(path)
            else:
                try:
                    reg = load_registry([path], builtin=False, use_env=False)
                except RegistryError:
                    return
                for entry in reg.entries:
                    reg.resolve(entry.backbone, entry.variant)
                    json.dumps(entry.net_config)

    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *argv, str(corpus)], one)
    try:
        atheris.Fuzz()
    finally:
        print(f"{target}: {runs[0]} cases", file=sys.stderr)


if __name__ == "__main__":
    _atheris_main(sys.argv[1], sys.argv[2:])
