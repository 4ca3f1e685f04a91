"""Soak test: thousands of tiny CPU decodes with faults injected, then a check that nothing was lost or corrupted.

    python scripts/soak.py --minutes 20            # until 20 minutes or --target decodes, whichever first
    python scripts/soak.py --minutes 2 --keep      # keep the work folder to look at

It uses the tiny upstream fixture decoder (tests/fixtures/pid_parity/v1_flux, 64x64 px per 2x2 latent) through
a user registry, like the tests. Each *generation* decodes one input set into a fresh output folder in *rounds*
of `pid decode` processes until a fault-free round finishes. Rounds pick at random:

  * disk full: ENOSPC (after a short write, or from fsync) on a share of the PNG writes;
  * out of memory: torch.cuda.OutOfMemoryError for a share of the batches larger than one image;
  * SIGINT or SIGKILL after a random delay;
  * two processes at once on the same output folder;
  * the batch size (1-4).

Inputs mix good latents (every container and layout, batches, sub-folders, a manifest with output names,
sidecar prompts, a file name with undecodable bytes) with bad ones (tests/test_fuzz.py's hostile files:
huge declared shapes, truncations, NaN/overflow, code-executing pickles, ...; manifest outputs that try to
leave --out; randomly damaged copies of good files, classified by the library's own loader).

Checked after every round: every PNG in the output folder decodes completely and is not uniformly black;
nothing appeared outside the output folder; no code from a pickle ran; a round that was not killed exited
with 1 (its bad inputs) or 130 (SIGINT) and wrote exactly one record per input. After the final fault-free
round of each generation: every good input has exactly its PNG(s), each linked into place by exactly one
process (or by one that was then killed before it could log it), every bad input a "failed" record, and
no temporary file is left. Any violation stops the soak with exit status 1.

The child process (`soak.py child ...`) installs the fault hooks in-process (wrapping pid_cli.outputs' `os`,
decode.session.write_atomic and Decoder.decode_tensor) and then runs the ordinary CLI; production code has no hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# ---------------------------------------------------------------------------------------------------------
# The child: one `pid decode` with faults


def child(argv: list[str]) -> int:
    import errno

    parser = argparse.ArgumentParser(prog="soak.py child")
    parser.add_argument("--enospc", type=float, default=0.0)
    parser.add_argument("--oom", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("decode", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    rng = random.Random(opts.seed)

    import torch

    from pid_cli import outputs
    from pid_cli.cli import app
    from pid_cli.decode import session
    from pid_cli.pipeline import Decoder

    log_fd = os.open(opts.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(event: str, **fields) -> None:
        os.write(log_fd, (json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n").encode())

    class FullDisk:
        """`os` for pid_cli.outputs: PNG writes hit ENOSPC at random (after a short write, or in fsync)."""

        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            if opts.enospc and rng.random() < opts.enospc:
                log("enospc")
                if len(data) > 1 and rng.random() < 0.5:
                    return os.write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, data)

        def fsync(self, fd):
            if opts.enospc and rng.random() < opts.enospc / 2:
                log("enospc")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.fsync(fd)

    outputs.os = FullDisk()
    write_atomic = session.write_atomic

    def logged_write(path, data, overwrite=False, root=None):
        write_atomic(path, data, overwrite, root)
        log("linked", path=os.fsencode(path).hex())  # hex: names may hold undecodable bytes

    session.write_atomic = logged_write
    decode = Decoder.decode_tensor

    def small_gpu(self, latents, *a, **kw):
        if latents.shape[0] > 1 and opts.oom and rng.random() < opts.oom:
            log("oom", batch=latents.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return decode(self, latents, *a, **kw)

    Decoder.decode_tensor = small_gpu
    try:
        app(args=opts.decode, prog_name="pid")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _child_main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when run in the background
    try:
        return child(argv)
    except KeyboardInterrupt:  # SIGINT while this wrapper was still importing torch: not pid's doing
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # report it as what it was: death by SIGINT
        return 130


# ---------------------------------------------------------------------------------------------------------
# Inputs


class Inputs:
    """The input set of a soak run and what each input must end as."""

    def __init__(self, work: Path, rng: random.Random, n_good: int, n_damaged: int):
        import numpy as np
        import torch
        import yaml
        from conftest import PARITY, tiny_config
        from helpers import check_latent, hostile_latents
        from safetensors.torch import save_file

        from pid_cli.inputs.latent_files import read_latent_file
        from pid_cli.text import save_prompt_embeds

        self.work = work
        self.folder = work / "in"
        self.marker = work / "PWNED"
        self.outside = work / "outside"
        self.outside.mkdir(parents=True)
        self.registry = work / "registry.yaml"
        self.registry.write_text(yaml.safe_dump({"version": 1, "entries": [{
            "id": "tiny-flux", "base": "flux-2k", "variant": "tiny",
            "path": str(PARITY / "v1_flux" / "model_fp32.safetensors"), "net_config": tiny_config("v1_flux"),
            "output_sizes": {"buckets": ["64x64"], "multiple_of": 16}}]}))
        prompts = ["", "a red fox", "a lighthouse at dusk", "caf\udc80 au lait"]
        self.embeds = work / "emb.safetensors"
        save_prompt_embeds(self.embeds, prompts, torch.randn(len(prompts), 12, 32,
                                                             generator=torch.Generator().manual_seed(0)))
        self.good: dict[Path, list[str]] = {}  # input → output names relative to --out
        self.bad: set[Path] = set()
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))

        def latent(*shape):
            return torch.randn(*shape, generator=gen)

        for i in range(n_good):
            sub = rng.choice(["", "", "a", "a/b"])
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
            hw = rng.choice([(2, 2), (2, 2), (2, 3), (3, 2)])
            batch = rng.choice([0, 0, 0, 1, 2, 3])  # 0: a single [C, h, w] latent
            z = latent(*((batch,) if batch else ()), 16, *hw)
            kind = rng.choice(["safetensors", "safetensors", "pt", "npy", "npz", "latent"])
            stem = f"g{i:04d}"
            path = self.folder / sub / f"{stem}.{kind}"
            if kind == "safetensors":
                save_file({"latent": z.contiguous()}, path, metadata={"prompt": rng.choice(prompts[:3])})
            elif kind == "latent":
                # as ComfyUI's SaveLatent writes it (0.3.64): the raw VAE latent, the version marker as a tensor
                save_file({"latent_tensor": (z / 0.3611 + 0.1159).contiguous(),
                           "latent_format_version_0": torch.tensor([])}, path,
                          metadata={"prompt": json.dumps({"3": {"class_type": "KSampler"}})})
            elif kind == "pt":
                torch.save({"latents": z}, path)
            elif kind == "npy":
                np.save(path, z.numpy())
            else:
                np.savez(path, samples=z.numpy())
            if rng.random() < 0.1:  # a sidecar prompt (one the embeddings file holds)
                path.with_suffix(".txt").write_text(rng.choice(prompts[1:3]))
            self.good[path] = _names(f"{sub}/{stem}" if sub else stem, batch or 1)
        odd = self.folder / os.fsdecode(b"odd_\xff_name.safetensors")  # undecodable bytes in a good name
        save_file({"x": latent(16, 2, 2)}, odd)
        self.good[odd] = [odd.with_suffix(".png").name]
        bad_sidecar = self.folder / "bad_sidecar.safetensors"
        save_file({"x": latent(16, 2, 2)}, bad_sidecar)
        bad_sidecar.with_suffix(".txt").write_bytes(b"\xff\xfe not UTF-8")
        self.bad.add(bad_sidecar)
        for k in range(2):  # every hostile kind, twice, in two folders
            self.bad.update(hostile_latents(self.folder / f"hostile{k}", self.marker).values())
        # randomly damaged copies of good files: the library's loader decides what they must end as
        damaged = self.folder / "damaged"
        damaged.mkdir()
        sources = [p for p in self.good if p.suffix != ".txt" and "odd_" not in p.name]
        for i in range(n_damaged):
            src = rng.choice(sources)
            data = bytearray(src.read_bytes())
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(data))
                if rng.random() < 0.3:
                    del data[at:]
                    if not data:
                        break
                else:
                    data[at] ^= rng.randrange(1, 256)
            path = damaged / f"d{i:04d}{src.suffix}"
            path.write_bytes(bytes(data))
            if check_latent(path) == "accepted":
                file = read_latent_file(path)
                prompt = file.metadata.get("prompt")
                if isinstance(prompt, str) and prompt not in prompts:  # its damaged prompt has no embedding
                    self.bad.add(path)
                else:
                    count = file.tensor.shape[0] if file.tensor.dim() > 3 else 1
                    self.good[path] = _names(f"damaged/{path.stem}", count)
            else:
                self.bad.add(path)
        # a manifest: custom output names, one with an unencodable prompt, and names that try to leave --out
        extra = work / "manifest_inputs"
        extra.mkdir()
        rows = []
        for i, name in enumerate(["named/one.png", "named/two.png", "../escape.png", str(self.outside / "abs.png"),
                                  "link/through.png", "sub/../../up.png", "not_a_png.jpg"]):
            path = extra / f"m{i}.safetensors"
            save_file({"x": latent(16, 2, 2)}, path)
            row = {"input": str(path), "output": name}
            if i == 1:
                row["prompt"] = prompts[3]
            rows.append(row)
            if i < 2:
                self.good[path] = [name]
            else:
                self.bad.add(path)
        self.manifest = work / "manifest.jsonl"
        self.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def args(self, out: Path, records: Path, batch: int) -> list[str]:
        return ["decode", str(self.folder), str(self.manifest), "--recursive", "--backbone", "flux", "--variant",
                "tiny", "--registry", str(self.registry), "--prompt-embeds", str(self.embeds), "--out", str(out),
                "--quiet", "--batch-size", str(batch), "--manifest-out", str(records)]

    def expected_pngs(self, out: Path) -> dict[Path, Path]:
        return {out / name: src for src, names in self.good.items() for name in names}


def _names(stem: str, count: int) -> list[str]:
    """The default template's output names ({dir}/{stem}.png; items of a batch file get _i)."""
    return [f"{stem}.png"] if count == 1 else [f"{stem}_{k}.png" for k in range(count)]


# ---------------------------------------------------------------------------------------------------------
# Checks


class SoakError(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SoakError(message)


def check_pngs(out: Path) -> int:
    """Every PNG decodes completely and is not uniformly black; returns how many there are."""
    import numpy as np
    from PIL import Image

    n = 0
    for p in out.rglob("*.png"):
        try:
            with Image.open(p) as im:
                im.load()
                pixels = np.asarray(im)
        except Exception as e:
            raise SoakError(f"{p}: not a complete PNG ({e})") from e
        check(pixels.max() > 0, f"{p}: an all-black image")
        n += 1
    return n


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the partial last line of a process killed mid-record
            continue
    return out


def check_round(inputs: Inputs, out: Path, runs: list[tuple[int, Path]]) -> None:
    """After any round. `runs`: each process's exit status and records file."""
    check_pngs(out)
    check(not any(inputs.outside.iterdir()), f"something was written outside --out: {list(inputs.outside.iterdir())}")
    check(not (inputs.work / "escape.png").exists() and not (inputs.work / "up.png").exists(),
          "a manifest output escaped --out")
    check(not inputs.marker.exists(), "code from a pickle ran")
    every = {str(p) for p in [*inputs.good, *inputs.bad]}
    for code, path in runs:
        if code < 0 or (code == 130 and not path.exists()):  # killed, or interrupted before the run began
            continue
        check(code in (1, 130), f"exit code {code} from a run with bad inputs ({path.name})")
        counts = Counter(r["input"] for r in read_records(path))
        check(set(counts) == every, f"{path.name}: records missing for {sorted(every - set(counts))[:5]}, "
                                    f"extra {sorted(set(counts) - every)[:5]}")
        check(all(c == 1 for c in counts.values()),
              f"{path.name}: inputs with several records: {[k for k, c in counts.items() if c != 1][:5]}")


def check_final(inputs: Inputs, out: Path, records: list[dict], linked: Counter) -> tuple[int, int]:
    expected = inputs.expected_pngs(out)
    present = {p for p in out.rglob("*.png")}
    missing = set(expected) - present
    extra = present - set(expected)
    check(not missing, f"good inputs without their PNG: {sorted(map(str, missing))[:5]}")
    check(not extra, f"PNGs that no good input should have made: {sorted(map(str, extra))[:5]}")
    twice = [p for p, n in linked.items() if n > 1]
    check(not twice, f"files linked into place more than once: {twice[:5]}")
    status = {r["input"]: r for r in records}
    for bad in inputs.bad:
        rec = status.get(str(bad))
        check(rec is not None and rec["status"] == "failed" and rec["error"], f"{bad}: no failure record ({rec})")
    for good in inputs.good:
        rec = status.get(str(good))
        check(rec is not None and rec["status"] in ("ok", "skipped"), f"{good}: not decoded ({rec})")
    leftovers = [p for p in out.rglob(".*") if p.is_file()]
    check(not leftovers, f"temporary files left behind: {leftovers[:5]}")
    return len(expected), len(inputs.bad)


# ---------------------------------------------------------------------------------------------------------
# The parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="stop starting generations after this")
    parser.add_argument("--target", type=int, default=3000, help="stop after this many decoded images")
    parser.add_argument("--good", type=int, default=60, help="good input files per generation")
    parser.add_argument("--damaged", type=int, default=20, help="randomly damaged copies per generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="pid-soak-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    started = time.time()
    stats = Counter()
    try:
        generation = 0
        while time.time() - started < opts.minutes * 60 and stats["decoded"] < opts.target:
            gen_dir = work / f"gen{generation:03d}"
            inputs = Inputs(gen_dir, rng, opts.good, opts.damaged)
            out = gen_dir / "out"
            out.mkdir()
            (out / "link").symlink_to(inputs.outside)
            linked: Counter = Counter()
            log = gen_dir / "events.jsonl"
            rnd = 0
            while True:
                final = rnd >= 8 or (rnd > 0 and rng.random() < 0.15)
                faults = {"enospc": 0.0 if final else rng.choice([0.0, 0.02, 0.1]),
                          "oom": 0.0 if final else rng.choice([0.0, 0.3])}
                kill = None if final else rng.choice([None, None, "SIGINT", "SIGKILL", "SIGKILL"])
                n_procs = 1 if final else rng.choice([1, 1, 2])
                batch = rng.randint(1, 4)
                procs, rec_files = [], []
                for k in range(n_procs):
                    rec = gen_dir / f"records-{rnd:02d}-{k}.jsonl"
                    rec_files.append(rec)
                    cmd = [sys.executable, __file__, "child", "--enospc", str(faults["enospc"]), "--oom",
                           str(faults["oom"]), "--seed", str(rng.randrange(1 << 30)), "--log", str(log), "--",
                           *inputs.args(out, rec, batch)]
                    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
                if kill is not None:
                    time.sleep(rng.uniform(1.0, 10.0))
                    for p in procs:
                        if p.poll() is None:
                            p.send_signal(getattr(signal, kill))
                            stats[f"{kill.lower()}s sent"] += 1
                errs = [p.communicate(timeout=900)[1].decode("utf-8", "replace") for p in procs]
                codes = [p.returncode for p in procs]
                for k, (c, err) in enumerate(zip(codes, errs, strict=True)):
                    (gen_dir / f"stderr-{rnd:02d}-{k}.txt").write_text(f"kill={kill} exit={c}\n{err}")
                    check(c < 0 or c in (0, 1, 130), f"exit code {c} (a crash?):\n{err[-3000:]}")
                    check(c < 0 or "Traceback" not in err, f"a traceback:\n{err[-3000:]}")
                check_round(inputs, out, list(zip(codes, rec_files, strict=True)))
                records = [r for f in rec_files for r in read_records(f)]
                stats["rounds"] += 1
                stats["processes"] += n_procs
                stats["concurrent rounds"] += n_procs > 1
                if final:
                    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
                    for e in events:
                        if e["event"] == "linked":
                            linked[e["path"]] += 1
                    stats["decoded"] += sum(linked.values())
                    stats["ENOSPC injected"] += sum(e["event"] == "enospc" for e in events)
                    stats["OOM injected"] += sum(e["event"] == "oom" for e in events)
                    good_pngs, bad = check_final(inputs, out, records, linked)
                    stats["good inputs"] += len(inputs.good)
                    stats["good PNGs checked"] += good_pngs
                    stats["bad inputs"] += bad
                    stats["generations"] += 1
                    break
                rnd += 1
            print(f"generation {generation}: {dict(stats)} ({time.time() - started:.0f} s)", flush=True)
            generation += 1
            if not opts.keep:
                shutil.rmtree(gen_dir, ignore_errors=True)
    except SoakError as e:
        print(f"SOAK FAILED: {e}\n(work folder kept: {work})", file=sys.stderr)
        return 1
    print(json.dumps({"result": "ok", "minutes": round((time.time() - started) / 60, 1), **stats}, indent=1))
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit(main())
