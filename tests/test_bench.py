"""The benchmark runs on the CPU in seconds and prints every figure of its table."""

import re

import pytest

from tadfkd import bench

FIGURES = [label for _, label, _ in bench.ROWS]


@pytest.mark.slow
def test_small_benchmark_prints_the_whole_table(capsys):
    figures = bench.main(
        ["--small", "--iters", "1", "--student-steps", "1", "--batch-size", "32", "--device", "cpu"]
    )
    out = capsys.readouterr().out
    assert "device: CPU" in out and "fast path precision fp32" in out
    assert re.search(r"measured matmul rate \(float32\): [0-9.e+-]+ TFLOP/s", out)
    for label in FIGURES:
        line = next(line for line in out.splitlines() if line.startswith(label))
        values = line[len(label) :].split()
        assert len(values) == 3, line  # fast, published-style, unit
        if label == "peak GPU memory":
            assert values[:2] == ["n/a", "n/a"]
        else:
            assert all(float(value) >= 0 for value in values[:2]), line
    assert re.search(r"speed-up of fast over published-style .*: [0-9.]+ x", out)
    for path in ("fast", "published-style"):
        assert figures[path]["s_per_epoch"] == pytest.approx(36 * figures[path]["s_per_iter"])
        assert figures[path]["batches_generated"] >= figures[path]["batches_used"] >= 1
        assert 0 < figures[path]["selection_share"] < 100
        assert figures[path]["tflop_per_iter"] > 0


@pytest.mark.gpu
def test_on_a_gpu_the_fast_path_beats_the_published_style_path_on_cifar(capsys):
    figures = bench.main(["--iters", "2", "--student-steps", "2", "--batch-size", "256"])
    assert figures["fast"]["s_per_iter"] < figures["published-style"]["s_per_iter"]
    assert figures["fast"]["peak_gib"] > 0
