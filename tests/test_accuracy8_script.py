"""scripts/accuracy8.py end to end on the CPU: a tiny network, every family member, size and 8-bit mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accuracy8_measures_every_member_size_and_mode(tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: more threads only contend (10x slower on 2 cores)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "accuracy8.py"), "--device", "cpu", "--tiny",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    members = [m["name"] for m in report["family"]]
    assert len(members) >= 6 and report["sizes"] == [32, 64] and report["card"] == "cpu"
    measured = {(r["member"], r["size"], r["mode"]) for r in report["results"]}
    assert measured == {(m, s, mode) for m in members for s in report["sizes"] for mode in report["modes"]}
    assert len(report["results"]) == len(measured)
    assert set(report["modes"]) == {"8bit", "fp8", "8bit+fp8", "8bit+fp8 keep-ends"}
    for r in report["results"]:  # moved by the quantisation, not broken by it
        assert math.isfinite(r["psnr_db"]) and 20 < r["psnr_db"] < 100, r
        assert 0 < r["max_diff"] <= 255 and 0 <= r["over2"] <= 1, r
    assert len(report["worst"]) == len(report["modes"]) * len(report["sizes"])
    for w in report["worst"]:
        same = [r for r in report["results"] if r["mode"] == w["mode"] and r["size"] == w["size"]]
        assert w["min_psnr_db"] == min(r["psnr_db"] for r in same)
        assert w["max_diff"] == max(r["max_diff"] for r in same)
    assert "| mode | size | min PSNR dB |" in done.stdout and all(m in done.stdout for m in members)
