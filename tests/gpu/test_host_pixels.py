"""The pixels `pid decode` copies off the GPU (`outputs.HostPixels`: PNG levels computed on the GPU, copied behind
the decode into pinned memory) equal the CPU's levels bit for bit, and an item holding NaN is flagged, not written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pid_cli.outputs import HostPixels, to_uint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bits", [8, 16])
def test_host_pixels_equal_cpu_levels(bits, cuda, measured):
    images = torch.rand(3, 3, 256, 384, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # some out of range
    images[1, 2, 7, 9] = float("nan")
    host = HostPixels(images.to(cuda), bits)
    expected = to_uint(images.nan_to_num(), bits)
    same = [np.array_equal(host.get(i), expected[i]) for i in (0, 2)]
    measured(f"{bits}-bit pixels through pinned memory: items 0, 2 equal to the CPU levels {same}, "
             f"NaN item flagged {host.get(1) is None}")
    assert all(same)
    assert host.get(1) is None
