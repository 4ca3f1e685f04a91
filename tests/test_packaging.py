"""Packaging: the checkpoint registry is one file at the repository's top level, and setup.py copies it into the
wheel's `pid_cli/`; the sdist carries it (MANIFEST.in), so a wheel built from the sdist has it too. Builds run
offline (`--no-build-isolation`, the environment's setuptools) on a copy of the tree, so the checkout gets no
build/ or *.egg-info and parallel test workers do not share one build folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "registry.yaml"


@pytest.fixture
def source(tmp_path) -> Path:
    """The checkout without its dot-folders (.git, .venv, caches) and build leftovers."""
    dest = tmp_path / "src"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__"))
    return dest


def pip_wheel(what: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(out), str(what)], check=True)
    (wheel,) = out.glob("pid_cli-*.whl")
    return wheel


def test_the_registry_is_one_top_level_file():
    """No copy (nor a symlink, which some checkouts cannot hold) inside the package."""
    assert REGISTRY.is_file() and not REGISTRY.is_symlink()
    assert not (ROOT / "pid_cli" / "registry.yaml").exists()


@pytest.mark.slow
def test_the_wheel_ships_the_registry_and_reads_it(source, tmp_path):
    wheel = pip_wheel(source, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("pid_cli/registry.yaml") == REGISTRY.read_bytes()
        zf.extractall(tmp_path / "site")
    # Imported from the unpacked wheel (PYTHONPATH comes before the editable install), pid reads its packaged copy.
    probe = "import pid_cli.registry as r; r.load_registry(use_env=False); print(r.BUILTIN_REGISTRY)"
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert Path(run.stdout.strip()) == (tmp_path / "site" / "pid_cli" / "registry.yaml").resolve()


@pytest.mark.slow
def test_the_sdist_carries_the_registry_and_its_wheel_ships_it(source, tmp_path):
    """The sdist through setuptools' own PEP 517 hook (what `python -m build --sdist` calls), then pip's wheel."""
    hook = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'sdist')!r}))"
    name = subprocess.run([sys.executable, "-c", hook], cwd=source, capture_output=True, text=True,
                          check=True).stdout.split()[-1]
    sdist = tmp_path / "sdist" / name
    with tarfile.open(sdist) as tf:
        assert tf.extractfile(f"{name.removesuffix('.tar.gz')}/registry.yaml").read() == REGISTRY.read_bytes()
    with zipfile.ZipFile(pip_wheel(sdist, tmp_path / "wheel")) as zf:
        assert zf.read("pid_cli/registry.yaml") == REGISTRY.read_bytes()
