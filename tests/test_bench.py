"""The benchmark runs on the CPU in seconds and prints every figure of its table."""

import re

import numpy as np
import pytest
import torch
from helpers import ROOT

from tadfkd import bench
from tadfkd.teachers import read_state_dict

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


@pytest.mark.slow
def test_profile_prints_the_top_operators_and_the_host_side_counts(capsys):
    bench.main(
        ["--small", "--iters", "1", "--student-steps", "1", "--batch-size", "32"]
        + ["--device", "cpu", "--profile"]
    )
    out = capsys.readouterr().out
    assert "profile of one fast-path iteration, top 15 by self_cpu_time_total:" in out
    calls = re.search(r"host-side counts per iteration: operator calls (\d+) \(CPU\)", out)
    assert calls and int(calls.group(1)) > 100


@pytest.mark.gpu
def test_on_a_gpu_the_fast_path_beats_the_published_style_path_on_cifar(capsys):
    figures = bench.main(["--iters", "2", "--student-steps", "2", "--batch-size", "256"])
    assert figures["fast"]["s_per_iter"] < figures["published-style"]["s_per_iter"]
    assert figures["fast"]["peak_gib"] > 0


def test_the_published_style_path_differs_only_through_its_seam_and_settings():
    # unfolded, so that loading trained weights into the teacher reaches its scoring forward
    cfg = bench.bench_config(
        ["runtime.device=cpu", "trainer.batch_size=64", "speed.fold_teacher_bn=false"]
    )
    published_cfg = bench.bench_config(
        ["runtime.device=cpu", "trainer.batch_size=64", *bench.PUBLISHED_STYLE]
    )
    cpu = torch.device("cpu")
    fast = bench.build(cfg, cpu, published=False, seed=0).synthesizer
    published = bench.build(published_cfg, cpu, published=True, seed=0).synthesizer
    assert isinstance(published.scorer, bench.PublishedStyleScorer)
    assert not published.adaptive_rounds and published.precision.name == "fp32"
    assert fast.adaptive_rounds and fast.scorer == fast.score
    trained = read_state_dict(ROOT / "Pretrained_Teachers" / "digits" / "digits_cnn.pt")
    for synthesizer in (fast, published):  # a trained teacher: a random one has no clean end
        synthesizer.teacher.load_state_dict(trained)
    torch.manual_seed(1)
    np.random.seed(1)  # scikit-learn's k-means++ start draws from numpy's global generator
    with torch.no_grad():
        images = torch.cat([fast.generate(64) for _ in range(16)])
    # Same weights (same seed), the same selection computed two ways: scikit-learn's random
    # k-means++ start against the exact 1-D split, so nearly, not always, the same samples.
    # The published style scores one generated batch at a time.
    one_at_a_time = torch.cat([published.keep_mask(batch) for batch in images.split(64)])
    agreement = (fast.keep_mask(images) == one_at_a_time).float().mean()
    assert agreement >= 0.9


def test_agreement_measures_what_the_speed_settings_leave_unchanged(capsys):
    shares = bench.main(["--agreement", "--small", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "teacher digits_cnn (digits_cnn), generator untrained, 4096 generated samples" in out
    assert shares["fold_teacher_bn=true"] >= 0.999  # float rounding only
    assert 0.5 < shares["scoring=bf16"] <= 1.0
