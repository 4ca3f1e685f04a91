"""Helpers several test modules share (test modules never import each other): tiny `pid decode` runs, hostile
latent files, process inspection, the tiny Gemma tokenizer."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from typer.testing import CliRunner

from pid_cli.cli import app
from pid_cli.inputs.latent_files import MAX_LATENT_ABS, MAX_LATENT_SIDE, LatentError, read_latent_file, to_pid_latent
from pid_cli.registry import load_registry
from pid_cli.text import CHI_PREFIX

FLUX = load_registry().get("flux-2k").latent  # what a real Flux run reads latents as (ComfyUI files included)



SURROGATE_PROMPT = "a caf\udc80"  # a lone surrogate: valid in JSON and Python strings, not encodable as UTF-8

CASE_SECONDS = 20  # one case taking longer is a hang



@contextlib.contextmanager
def time_limit(seconds: float = CASE_SECONDS):
    """Fail a case that hangs (SIGALRM; tests run in the main thread)."""
    def timeout(signum, frame):
        raise TimeoutError(f"case took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)



def clean_error(err: Exception, path: Path | str) -> None:
    """A loader's error: names the file, and is not an allocation failure in disguise."""
    text = str(err)
    assert str(path) in text, text
    assert "MemoryError" not in text and "allocate" not in text, text



class _Storage:
    pass



class _View:
    """Pickles as torch._utils._rebuild_tensor_v2 over a persistent storage, with any size and stride."""

    def __init__(self, offset: int, size: tuple, stride: tuple):
        self.args = (offset, size, stride)

    def __reduce__(self):
        offset, size, stride = self.args
        return (torch._utils._rebuild_tensor_v2, (_Storage(), offset, size, stride, False, collections.OrderedDict()))



def torch_zip_bytes(numel: int, size: tuple, stride: tuple, data: bytes, offset: int = 0,
                    storage: type = torch.FloatStorage, compress: int = zipfile.ZIP_STORED) -> bytes:
    """A torch.save archive whose tensor claims `numel` storage elements and any view of them."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage, "0", "cpu", numel) if isinstance(obj, _Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"latent": _View(offset, size, stride)})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", data)
        z.writestr("archive/version", "3\n")
    return out.getvalue()



def code_pickle_pt(marker: Path, legacy: bool = False) -> bytes:
    """A .pt whose unpickling would create `marker` (through os.system) if anything ran it."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save({"latent": torch.zeros(16, 2, 2), "x": Evil()}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()



def hostile_latents(folder: Path, marker: Path | None = None) -> dict[str, Path]:
    """One file of every kind of bad latent input, each of which must end in a failure record."""
    folder.mkdir(parents=True, exist_ok=True)
    huge = [1 << 20, 1 << 20, 16]
    files = {
        "huge_shape.safetensors": safetensors_bytes(
            {"x": {"dtype": "F32", "shape": huge, "data_offsets": [0, 64]}}, bytes(64)),
        "header_too_long.safetensors": struct.pack("<Q", 1 << 62) + b"{}",
        "non_utf8_meta.safetensors": struct.pack("<Q", 86) + b'{"__metadata__":{"prompt":"\xff\xfe"},"x":{"dtype":'
                                     b'"F32","shape":[1],"data_offsets":[0,4]}}' + bytes(4),
        "truncated.safetensors": st_save({"x": torch.randn(16, 4, 4)})[:-100],
        "nan.safetensors": st_save({"x": torch.full((16, 2, 2), float("nan"))}),
        "overflow.safetensors": st_save({"x": torch.full((16, 2, 2), 1e30)}),
        "empty.safetensors": st_save({"x": torch.zeros(16, 0, 2)}),
        "int.safetensors": st_save({"x": torch.ones(16, 2, 2, dtype=torch.int32)}),
        "wrong_channels.safetensors": st_save({"x": torch.randn(4, 2, 2)}),
        "bad_size_meta.safetensors": st_save({"x": torch.randn(1, 1, 64)}, metadata={"height": "inf", "width": "-8"}),
        "huge.npy": npy_bytes("<f4", (1 << 20, 1 << 20, 16), bytes(64)),
        "big.npy": npy_bytes("<f4", (4096, 4096, 16), bytes(64)),
        "object.npy": npy_bytes("|O", (3,), b"\x80\x02N."),
        "lying.npz": lie_about_zip_sizes(npz_bytes({"latent": np.zeros((16, 2, 2), np.float32)}, zipfile.ZIP_DEFLATED),
                                         1 << 20),
        "stride0.pt": torch_zip_bytes(16, (1 << 30, 1 << 30), (0, 0), bytes(64)),
        "numel.pt": torch_zip_bytes(1 << 40, (1 << 20, 1 << 20), (1 << 20, 1), bytes(64)),
        "legacy.pt": _legacy_pt(),
        "code.pt": code_pickle_pt(marker or folder / "PWNED"),
        "code_legacy.pt": code_pickle_pt(marker or folder / "PWNED", legacy=True),
        "garbage.pt": os.urandom(256),
    }
    paths = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths[name] = folder / name
    weird = folder / os.fsdecode(b"bad_name_\xff.safetensors")  # undecodable bytes in a file name
    weird.write_bytes(files["nan.safetensors"])
    paths["non_utf8_name"] = weird
    return paths



def check_latent(path: Path, fmt: str = "auto", size: tuple[int, int] | None = None) -> str:
    """read + convert one file: a usable PiD latent, or a LatentError that names the file."""
    with time_limit():
        try:
            file = read_latent_file(path)
            z = to_pid_latent(file, FLUX, "flux", fmt, size)
        except LatentError as e:
            clean_error(e, path)
            return "refused"
    assert z.dtype == torch.float32 and z.dim() == 4 and z.shape[1] == 16
    assert 0 < max(z.shape[-2:]) <= MAX_LATENT_SIDE and z.numel() > 0
    assert torch.isfinite(z).all() and float(z.abs().max()) <= MAX_LATENT_ABS
    return "accepted"



def args(t, *extra, inputs=None):
    return ["decode", str(inputs or t["inputs"]), "--backbone", "flux", "--variant", "tiny", "--registry",
            str(t["reg"]), "--prompt-embeds", str(t["emb"]), "--out", str(t["out"]), "--quiet", *extra]



def run_cli(argv):
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, records



def latents(t, n, shape=(16, 2, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        save_file({"x": torch.randn(*shape, generator=gen)}, t["inputs"] / f"{i:02d}.safetensors")



def pngs(folder: Path) -> dict[str, np.ndarray]:
    """Every PNG in a folder, fully decoded (a partial file fails to load)."""
    out = {}
    for p in sorted(folder.rglob("*.png")):
        with Image.open(p) as im:
            im.load()
            out[p.name] = np.asarray(im)
    return out



def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*")) if folder.exists() else []



def spawn_decode(t, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pid_cli.cli", *args(t, *extra)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)



def children(pid: int) -> list[int]:
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



def wait_for_pngs(t, proc: subprocess.Popen, count: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and len(list(t["out"].glob("*.png")) if t["out"].exists() else []) < count:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)



def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"



def all_gone(pids: list[int], within_s: float = 10.0) -> bool:
    """Whether every process in `pids` has ended within `within_s`. Multiprocessing's resource tracker (one of a
    multi-device run's children) exits when the parent's end closes its pipe, so on a loaded machine it can
    still be tearing down the instant the parent's exit code arrives; a process left behind stays alive."""
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True



FIXTURE = Path(__file__).parent / "fixtures" / "gemma2_text"



TINY_GEMMA = FIXTURE / "tiny_gemma2"



# sha256 of upstream's prefix text (8 lines, "\n"-joined, ending in "User Prompt: ").
CHI_SHA256 = "62b9ab89eebb0ac5ee4d264bf96bf19d2b81f504bc3852500efeaf5a34d638b1"



LONG = " ".join(["a red fox jumps over the lazy dog in the snow"] * 60)  # ≫ 299 tokens



def train_tokenizer() -> Tokenizer:
    """Gemma-like: spaces → "▁", BPE, <pad>=0 <eos>=1 <bos>=2 (the tiny model's ids), BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator([CHI_PREFIX, LONG, "a cat sleeping on a warm windowsill", "A dog"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def safetensors_bytes(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload



def npy_bytes(descr: str, shape: object, payload: bytes = b"", fortran: bool = False,
              version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy file with any header (np.save would refuse to write lies)."""
    shape_text = shape if isinstance(shape, str) else repr(shape)  # a string goes in as written
    text = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape_text}, }}"
    size_field = 2 if version == (1, 0) else 4
    pad = -(10 + size_field - 8 + len(text) + 1) % 64  # numpy aligns the data to 64 bytes
    text = text + " " * pad + "\n"
    length = struct.pack("<H" if size_field == 2 else "<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text.encode("latin-1") + payload



def lie_about_zip_sizes(data: bytes, factor: int) -> bytes:
    """Multiply every member's declared uncompressed size (local and central headers) by `factor`."""
    out = bytearray(data)
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = out.find(sig)
        while pos != -1:
            (size,) = struct.unpack_from("<I", out, pos + at)
            struct.pack_into("<I", out, pos + at, min(size * factor + 1, 0xFFFFFFFE))
            pos = out.find(sig, pos + 4)
    return bytes(out)



def npz_bytes(arrays: dict[str, np.ndarray], compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as z:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.save(buf, a)
            z.writestr(f"{name}.npy", buf.getvalue())
    return out.getvalue()



def _legacy_pt() -> bytes:
    buf = io.BytesIO()
    torch.save({"latent": torch.zeros(16, 2, 2)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()

