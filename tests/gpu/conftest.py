"""Shared setup of the GPU tests: the device each runs on, fp32 without TF32, and the measured numbers.

Each test writes one line per case of what it measured. Under pytest-xdist (`-n 8`: compiling the tiny networks is
serial CPU work, so the compiled cases spread across processes) a worker's prints never reach the terminal, even
with `-s`, so the lines also travel in the test reports and the run's summary lists them in test order."""

from __future__ import annotations

import os

import pytest
import torch

# "cpu" runs the fixture parity tests on the CPU, to check them off a GPU; the kernel and graph tests need CUDA
# whatever it says.
DEVICE = os.environ.get("PID_GPU_TESTS_DEVICE", "cuda")


@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions in fp32: the fp32 bounds are fp32's, and TF32 keeps 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def dev(no_tf32) -> torch.device:
    """The fixture parity tests' device: the GPU, or the CPU with PID_GPU_TESTS_DEVICE=cpu."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (PID_GPU_TESTS_DEVICE=cpu runs the fixture cases on the CPU)")
    return torch.device(DEVICE)


@pytest.fixture
def cuda(no_tf32) -> torch.device:
    return torch.device("cuda")


@pytest.fixture
def measured(record_property):
    """`measured(line)`: one line of what a test measured, printed and listed in the run's summary."""
    def line(text: str) -> None:
        print(text, flush=True)
        record_property("measured", text)

    return line


def pytest_terminal_summary(terminalreporter):
    lines = sorted((report.nodeid, text) for outcome in ("passed", "failed")
                   for report in terminalreporter.stats.get(outcome, ()) if report.when == "call"
                   for name, text in report.user_properties if name == "measured")
    if lines:
        terminalreporter.section("measured (tests/gpu)")
        for _, text in lines:
            terminalreporter.write_line(text)
