"""A/B the 8-bit attention kernel of an earlier git revision against the working tree's, in one process on one
GPU, on PiD's attention shapes: TFLOP/s (best of two interleaved rounds) and relative L2 error against fp32
attention. Card-to-card spread is larger than the kernel changes measured here, so both run side by side.

    python scripts/attention8_ab.py 4b464d2          # the kernel before the fused logit FMA
    python scripts/attention8_ab.py c53003b          # the kernel before the ones-channel denominator
    python scripts/attention8_ab.py .base            # a folder holding another checkout's pid_cli (where the
                                                     # working tree travels without its git history)

Each side quantises K and V with its own revision's `quantize_kv` (their layouts may differ).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from attention8_bench import SHAPES, inputs, rel_l2, sdpa, timed  # noqa: E402

from pid_cli.kernels import attention8 as attention8_kernel  # noqa: E402
from pid_cli.kernels import reference  # noqa: E402

# (module, its file) loaded from the other side, the module doing `quantize_kv` first, then the one with `launch`:
# pid_cli/kernels/ since the kernels moved there, pid_cli/model/ before
LAYOUTS = {"kernels": [("constants", "pid_cli/kernels/constants.py"), ("reference", "pid_cli/kernels/reference.py"),
                       ("attention8_kernel", "pid_cli/kernels/attention8.py")],
           "model": [("attention8", "pid_cli/model/attention8.py"),
                     ("attention8_kernel", "pid_cli/model/attention8_kernel.py")]}
IMPORTS = {"from pid_cli.kernels.constants import": "from ab_constants import",
           "from pid_cli.kernels import constants\n": "import ab_constants as constants\n",
           "from pid_cli.model.attention8 import": "from ab_attention8 import",
           "from pid_cli.model.layers import on_device": "from pid_cli.kernels.ops import on_device"}


def read(rev: str, path: str) -> str | None:
    if Path(rev).is_dir():
        file = Path(rev) / path
        return file.read_text() if file.is_file() else None
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def load_revision(rev: str, folder: Path):
    """The revision's (or the folder's) `quantize_kv` module and kernel module, loaded under private names."""
    files = LAYOUTS["kernels"] if read(rev, LAYOUTS["kernels"][-1][1]) is not None else LAYOUTS["model"]
    modules = []
    for name, file in files:
        source = read(rev, file)
        if source is None:
            raise SystemExit(f"{rev}: no {file}")
        for old, new in IMPORTS.items():
            source = source.replace(old, new)
        path = folder / f"ab_{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(f"ab_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"ab_{name}"] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[-2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the git revision (or a folder holding pid_cli/) whose kernel is side A")
    ap.add_argument("--logit-std", type=float, default=1.0,
                    help="spread of the logits the speed is timed on (a kernel's work may depend on the data)")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, tmp)
        old8, old_kernel = load_revision(args.rev, Path(tmp))
        sides = {args.rev: (old8, old_kernel), "working tree": (reference, attention8_kernel)}
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print(f"| shape | {' | '.join(f'{s} TFLOP/s' for s in sides)} | rel L2 vs fp32, logit std 1 / 3 |")
        print("|---|---|---|---|")
        for name, shape in SHAPES.items():
            compare(name, shape, sides, gen, args.logit_std)
            torch.cuda.empty_cache()


def compare(name: str, shape: tuple[int, int, int, int], sides: dict, gen: torch.Generator, logit_std: float) -> None:
    nq, nk, heads, d = shape
    q, k, v = inputs(nq, nk, heads, d, logit_std, gen)
    packed = {s: m8.quantize_kv(k, v) for s, (m8, _) in sides.items()}
    flops = 4 * nq * nk * d * heads
    best = dict.fromkeys(sides, 0.0)
    for _ in range(2):  # interleaved, so clocks and temperature treat both alike
        for s, (_, kernel) in sides.items():
            t = timed(lambda kernel=kernel, s=s: kernel.launch(q, *packed[s], nk))
            best[s] = max(best[s], flops / t / 1e12)
    errors = []
    for std in (1.0, 3.0):
        qs, ks, vs = inputs(2048, nk, heads, d, std, gen)
        exact = sdpa(qs.float(), ks.float(), vs.float())
        errors.append(" / ".join(f"{rel_l2(kernel.launch(qs, *m8.quantize_kv(ks, vs), nk), exact):.3e}"
                                 for m8, kernel in sides.values()))
    print(f"| {name} | {' | '.join(f'{best[s]:.0f}' for s in sides)} | {'; '.join(errors)} |", flush=True)

if __name__ == "__main__":
    main()
