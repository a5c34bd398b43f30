"""tools/conv_peak.py: the flop count by hand, the pre-packed convolution against the plain
one, and a short run's JSON.

Truth from outside the tool: multiply-adds counted by hand for a small convolution, and
``torch.nn.functional.conv2d`` of the same input for the pre-packed kernel's output.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

peak = load_script("tools/conv_peak.py", "queryinst_conv_peak")


def test_conv_flops_by_hand():
    # 2 images of 4x5 pixels, 3 -> 2 channels, 3x3 kernel: each of the 2*4*5*2 outputs
    # takes 3*3*3 = 27 multiply-adds, 2 flops each.
    assert peak.conv_flops(2, 3, 2, 3, 4, 5) == 2 * (2 * 4 * 5 * 2) * 27


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
@pytest.mark.parametrize("kernel", [1, 3])
def test_prepacked_convolution_equals_plain(kernel):
    row = peak.measure_shape((2, 16, 24, kernel, 9, 11), rounds=1)
    assert row["shape"] == [2, 16, 24, kernel, 9, 11]
    assert row["gflop"] == round(peak.conv_flops(2, 16, 24, kernel, 9, 11) / 1e9, 3)
    assert row["plain_ms"] > 0 and row["prepacked_ms"] > 0
    # float32 outputs of magnitude ~1: only summation order may differ
    assert row["max_abs_diff"] < 1e-4


def test_short_run_writes_every_shape(tmp_path):
    out = tmp_path / "peak.json"
    report = peak.main(["--rounds", "1", "--scale", "0.05", "--gemm-size", "64",
                        "--json-out", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["convolutions"]) == set(peak.SHAPES)
    assert report["gemm"]["gflop"] == pytest.approx(2 * 64 ** 3 / 1e9, abs=1e-3)
    assert report["gemm"]["gflops_per_s"] > 0
    fpn = report["convolutions"]["FPN P2 output 3x3 256->256"]
    assert fpn["shape"] == [1, 256, 256, 3, 10, 17]  # 200x336 at 0.05, rounded
    assert report["threads"] == 1


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        peak.main(["--rounds", "0"])
