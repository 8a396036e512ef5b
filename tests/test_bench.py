"""The benchmark runs on the CPU in seconds and prints every figure of its table."""

import multiprocessing
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, run_entry

from tadfkd.base import schema
from tadfkd.base.errors import UserError
from tadfkd.bench import checkouts as bench_checkouts
from tadfkd.bench import compare as bench
from tadfkd.bench import components as bench_components
from tadfkd.bench import operators, processes, setting, timing
from tadfkd.bench import published as published_path
from tadfkd.bench import threads as bench_threads
from tadfkd.distillation.meter import EpochMeter
from tadfkd.distillation.precision import cpu_has_bf16, resolve_precision
from tadfkd.models import kernels
from tadfkd.run import runtime
from tadfkd.teachers.loading import read_state_dict

FIGURES = [label for _, label, _ in bench.ROWS]


@pytest.mark.slow
def test_small_benchmark_prints_the_whole_table_at_each_thread_count(capsys):
    figures = bench.main(
        ["--small", "--iters", "1", "--student-steps", "1", "--batch-size", "32", "--device", "cpu"]
        + ["--threads", "1,2"]
    )
    out = capsys.readouterr().out
    precision = resolve_precision("auto", torch.device("cpu"))
    units = "yes" if cpu_has_bf16() else "no"
    for threads in (1, 2):
        blas = rf"\(loaded BLAS libraries: {threads}(, {threads})*\)"
        header = rf"\(bf16 units: {units}\), {threads} CPU thread\(s\) {blas}"
        assert re.search(header, out)
    assert out.count(f"fast path precision {precision}") == 2
    policy = (
        r"each path in a process of its own, malloc: fast (keeps freed memory|not glibc "
        r"\(nothing set\)) \(runtime.keep_freed_memory\), published-style (its own policy|not "
        r"glibc \(nothing set\)) \(as the published code runs\)"
    )
    assert len(re.findall(policy, out)) == 2
    rates = r"measured matmul rates \(TFLOP/s\): fp32 [0-9.e+-]+, bf16 [0-9.e+-]+"
    assert len(re.findall(rates, out)) == 2
    for label in FIGURES:
        line = next(line for line in out.splitlines() if line.startswith(label))
        values = line[len(label) :].split()
        assert len(values) == 3, line  # fast, published-style, unit
        if label == "peak GPU memory":
            assert values[:2] == ["n/a", "n/a"]
        else:
            assert all(float(value) >= 0 for value in values[:2]), line
    speedup = r"speed-up of fast over published-style: [0-9.]+x in time per iteration, [0-9.]+x"
    assert len(re.findall(speedup, out)) == 2
    for path in ("fast", "published-style"):
        assert figures[path]["s_per_epoch"] == pytest.approx(36 * figures[path]["s_per_iter"])
        assert figures[path]["batches_generated"] >= figures[path]["batches_used"] >= 1
        assert 0 < figures[path]["selection_share"] < 100
        assert figures[path]["tflop_per_iter"] > 0
        assert figures[path]["matmul_share_bf16"] > 0 and figures[path]["matmul_share_fp32"] > 0


def test_the_component_profile_adds_up_to_an_iteration(capsys):
    against = ["--against", "speed.single_channel_conv=false", "--pairs", "1"]
    operator_rows = ["--operators", "--top", "12"]
    found = bench_components.main(["--setting", "small", "--reps", "1", *operator_rows, *against])
    out = capsys.readouterr().out
    assert "generated batches per student step" in out
    assert re.search(r"; malloc: (keeps freed memory|its own policy|not glibc)", out)
    for name in ("generate one batch (no grad)", "teacher scoring forward", "generator step"):
        seconds, flops = found[name]
        assert seconds > 0 and flops > 0
        assert any(line.startswith(name) for line in out.splitlines())
    assert re.search(r"one iteration: \d+ ms timed; \d+ ms from the components", out)
    assert re.search(r"one iteration: \d+ ms timed; its \d+ operator calls, each timed", out)
    assert "convolutions and matmuls, top 12 by time:" in out
    kernel = "on" if kernels.kernels() is not None else "off"
    assert f"one-input-channel convolution kernels: {kernel}" in out
    tile = "F(4x4, 3x3)" if kernels.kernels() is not None else "off"
    assert f"Winograd convolution kernels: {tile}; " in out
    fit = "C" if kernels.kernels() is not None else "numpy"
    pairs = f"ReLU-pool kernels: {kernel}; BatchNorm kernels: {kernel}; "
    assert f"{pairs}output convolution kernels: {kernel}; mixture fit: {fit}" in out
    assert re.search(r"alternated iterations, 1 pair: this path [\d.]+ ms, with speed.single", out)


def test_each_operator_call_is_timed_with_its_flops_and_precision():
    a = torch.randn(64, 32, dtype=torch.bfloat16)
    b = torch.randn(32, 16, dtype=torch.bfloat16)
    x = torch.randn(8, 8)

    calls = operators.record(lambda: (a @ b, x.add_(1.0)))
    names = [call.name for call in calls]
    assert names == ["aten.mm.default", "aten.add_.Tensor"]
    matmul, add = calls
    assert matmul.flops == 2 * 64 * 32 * 16 and matmul.dense
    assert matmul.dtype == torch.bfloat16 and matmul.shape == (64, 16)
    assert matmul.operand == (32, 16) and add.operand == ()
    assert add.flops == 0 and not add.dense and add.dtype == torch.float32
    assert matmul.seconds > 0 and add.seconds > 0
    rates = {"fp32": 1e9, "bf16": 4e9}
    assert operators.at_matmul_rate(matmul, rates) == pytest.approx(matmul.flops / 4e9)


def test_a_recorded_call_has_the_precision_autocast_chose_and_its_weights_shape():
    a, b = torch.randn(16, 8), torch.randn(8, 4)
    with torch.autocast("cpu", torch.bfloat16):
        calls = operators.record(lambda: a @ b)
    matmul = next(call for call in calls if call.dense)
    assert matmul.dtype == torch.bfloat16 and matmul.flops == 2 * 16 * 8 * 4

    # two backward passes on one input tell apart by their weights, not by the input they share
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    wide = torch.randn(32, 16, 3, 3, requires_grad=True)
    narrow = torch.randn(64, 16, 1, 1, requires_grad=True)
    loss = F.conv2d(x, wide, padding=1).sum() + F.conv2d(x, narrow).sum()
    calls = operators.record(loss.backward)
    backward = [c for c in calls if c.name == "aten.convolution_backward.default"]
    assert sorted(c.operand for c in backward) == [(32, 16, 3, 3), (64, 16, 1, 1)]


def test_the_operator_split_sums_the_calls_by_kind_and_rates_the_dense_ones(capsys):
    conv = operators.OperatorCall(
        "aten.convolution.default", (4, 8), torch.float32, 0.2, 1e8, operand=(8, 2)
    )
    relu = operators.OperatorCall("aten.relu.default", (4, 8), torch.float32, 0.05, 0.0)
    split = operators.report([conv, conv, relu], 0.5, {"fp32": 1e9, "bf16": 4e9})
    assert split == pytest.approx({"dense": 0.4, "dense_at_rate": 0.2, "other": 0.05})
    out = capsys.readouterr().out
    assert "the other" not in out  # every group fits in the top ones
    assert re.search(
        r"aten.convolution.default\s+\[4, 8\] x \[8, 2\]\s+float32\s+2\s+400.00\s+50.0", out
    )
    assert re.search(r"aten.relu.default\s+1\s+50.00", out)
    assert (
        "one iteration: 500 ms timed; its 3 operator calls, each timed where it ran: convolutions "
        "and matmuls 400 ms (at the measured matmul rates of their precisions they would take "
        "200 ms, 50% of that), other operators 50 ms" in out
    )
    depthwise = operators.OperatorCall(
        "aten.convolution.default", (4, 8), torch.bfloat16, 0.1, 4e7, operand=(8, 1)
    )
    operators.report([conv, depthwise, relu, relu], 0.5, {"fp32": 1e9, "bf16": 4e9}, top=1)
    out = capsys.readouterr().out
    # the groups and operators beyond the top ones in one row each: calls, ms (and % of rate)
    assert re.search(r"the other 1 groups\s+1\s+100.00\s+10.0$", out, re.MULTILINE)
    assert "the other" not in out.split("other operators, top 1")[1]  # one operator: relu


@pytest.mark.parametrize(("scoring", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_components_time_the_scoring_forward_the_selection_runs(scoring, dtype):
    """The scoring forward is timed in ``speed.scoring``'s precision, as the refill runs it
    (it ran the inference teacher in fp32 whatever ``speed.scoring`` said)."""
    overrides = ["trainer.student_steps=1", f"speed.scoring={scoring}"]
    distiller = setting.build_path(
        setting.bench_config(overrides), torch.device("cpu"), False, seed=0
    )
    assert bench_components.parts(distiller)["teacher scoring forward"]().dtype == dtype


def test_the_operator_split_times_and_records_the_same_iteration(capsys):
    torch.set_num_threads(1)  # oneDNN's multi-threaded reductions may change the last bits
    distiller = setting.build_path(
        setting.bench_config(["trainer.student_steps=2"]), torch.device("cpu"), False, seed=0
    )
    distiller.iterate()  # a selection rate, optimiser states: the state a timed iteration has
    restore = bench_components.restore_point(distiller)
    first = operators.record(distiller.iterate)
    after_one = [p.detach().clone() for p in distiller.student.parameters()]
    restore()
    again = operators.record(distiller.iterate)
    assert [(c.name, c.shape) for c in again] == [(c.name, c.shape) for c in first]
    assert [c.flops for c in again] == [c.flops for c in first]
    restore()
    split = bench_components.operator_split(distiller, reps=1)
    # its recorded iteration is the one from the restore point: the student took that one step
    for parameter, expected in zip(distiller.student.parameters(), after_one, strict=True):
        assert torch.equal(parameter, expected)
    assert split["dense"] > 0 and split["other"] > 0 and 0 < split["dense_at_rate"]
    assert re.search(r"other operators \d+ ms$", capsys.readouterr().out, re.MULTILINE)


def test_alternated_iterations_swap_which_path_runs_first_and_pair_their_times(monkeypatch):
    order, clock = [], [0.0]

    class Path:  # an iteration of 2 student steps of 4 samples, ``seconds`` of a fake clock
        schedule = SimpleNamespace(batch_size=4, student_steps=2)

        def __init__(self, name: str, seconds: float) -> None:
            self.name, self.seconds, self.meter = name, seconds, None

        def iterate(self) -> None:
            order.append(self.name)
            clock[0] += self.seconds
            if self.meter is not None:  # three batches generated per student step
                self.meter.add({schema.GENERATED: 2 * 3 * 4.0})

    monkeypatch.setattr(bench_components.time, "perf_counter", lambda: clock[0])
    pairs = bench_components.alternated(Path("a", 0.3), Path("b", 0.5), pairs=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert pairs == [(pytest.approx(0.3), pytest.approx(0.5))] * 3
    line = bench_components.alternated_line(
        Path("a", 0.3), Path("b", 0.5), 2, "speed.single_channel_conv=false"
    )
    assert "2 pairs: this path 300.0 ms, with speed.single_channel_conv=false 500.0 ms" in line
    assert "(medians; 3.00 and 3.00 generated batches per student step)" in line
    assert "takes +200.0 ms an iteration (the median of the paired differences)" in line


def test_alternated_paths_that_compute_alike_draw_the_same_noise_and_do_the_same_work():
    torch.set_num_threads(1)
    cfg = setting.bench_config(["trainer.student_steps=2", "trainer.batch_size=32"])
    paths = [setting.build_path(cfg, torch.device("cpu"), False, seed=0) for _ in range(2)]
    for path in paths:
        path.meter = EpochMeter()
    bench_components.alternated(*paths, pairs=3)
    first, second = (path.meter.sums[schema.GENERATED] for path in paths)
    assert first == second
    for a, b in zip(paths[0].student.parameters(), paths[1].student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_benchmarks_config_is_checked_as_a_runs():
    with pytest.raises(UserError, match="runtime.keep_freed_memory='maybe' must be true or false"):
        setting.bench_config(["runtime.keep_freed_memory=maybe"])


@pytest.mark.parametrize("entry", ["-m tadfkd.bench", "-m tadfkd.bench.components"])
def test_a_bad_setting_ends_a_benchmark_in_one_sentence(entry):
    done = run_entry("--set", "runtime.keep_freed_memory=maybe", entry=entry, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: runtime.keep_freed_memory='maybe' must be true or false."


@pytest.mark.parametrize(
    "option",
    [
        ["--set", "speed.nope=1"],
        ["--against", "speed.nope=1"],
        ["--set", "speed.x=["],
        ["--set", "dataset=nope"],
    ],
)
def test_an_unknown_or_unparsable_override_ends_a_benchmark_in_one_sentence(option):
    """Before anything is measured: ``--against`` is checked with ``--set``, not after the
    component timings."""
    done = run_entry(*option, entry="-m tadfkd.bench.components", timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the benchmark's config refused")
    if "speed.nope" in option[1]:
        assert "Could not override 'speed.nope'" in lines[0] and "+speed.nope=1" in lines[0]
    if "dataset" in option[1]:
        assert (
            "Available options in 'dataset': cifar10, cifar100, digits, fashion_mnist" in lines[0]
        )


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (bench.main, ["--iters", "0"]),
        (bench.main, ["--warmup", "-1"]),
        (bench.main, ["--threads", "1,0"]),
        (bench.main, ["--batch-size", "0"]),  # was ignored: a batch size of 0 ran the setting's
        (bench.main, ["--student-steps", "-1"]),
        (bench_components.main, ["--pairs", "0"]),
        (bench_components.main, ["--reps", "0"]),
        (bench_components.main, ["--threads", "x"]),
        (bench_components.main, ["--top", "-3"]),
        (bench_threads.main, ["--iters", "0"]),
        (bench_threads.main, ["--setting", "nope"]),
    ],
)
def test_a_count_out_of_range_or_an_unknown_setting_is_refused_before_anything_runs(
    main, argv, capsys
):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    refusals = (
        "not a whole number above 0",
        "not a whole number of at least 0",
        "invalid choice: 'nope'",
    )
    assert any(refusal in error for refusal in refusals), error


def test_warm_up_iterations_run_untimed_before_the_timed_ones(monkeypatch):
    cpu = torch.device("cpu")
    distiller = setting.build_path(
        setting.bench_config(["trainer.student_steps=1"]), cpu, False, seed=0
    )
    stats, ran = timing.PathStats(distiller, cpu), []
    iterate = distiller.iterate
    monkeypatch.setattr(distiller, "iterate", lambda: ran.append(1) or iterate())
    timing.warm_up({"fast": stats}, 3)
    timing.time_paths({"fast": stats}, 2)
    assert len(ran) == 5  # 3 warm-up iterations, then 2 timed
    assert len(stats.seconds) == len(stats.batch_counts) == 2
    # the meter counts the timed iterations' batches only
    assert stats.batches_generated() == pytest.approx(sum(stats.batch_counts))


def test_an_agreement_generator_without_a_checkpoint_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"--generator .* holds no checkpoint; give a run"):
        bench.main(["--small", "--agreement", "--generator", str(tmp_path)])
    # --set reaches the agreement's config too (it was ignored there): a bad one stops it
    with pytest.raises(UserError, match="Could not override 'speed.nope'"):
        bench.main(["--small", "--agreement", "--set", "speed.nope=1"])


def test_the_threads_benchmark_times_a_worker_and_prints_the_ratios(monkeypatch, capsys):
    figures = bench_threads.worker("small", "1", 1)
    assert figures["threads"] == 1 and figures["s_per_iter"] > 0
    seen = []

    def fake(setting, threads, busy, iters):
        seen.append((threads, busy))
        return {"threads": 1 if threads == "1" or busy else 2, "s_per_iter": 0.2 + 0.1 * busy}

    monkeypatch.setattr(bench_threads, "run_configuration", fake)
    results = bench_threads.main(["--iters", "1"])
    out = capsys.readouterr().out
    assert seen == [("1", False), ("auto", False), ("1", True), ("auto", True), ("all", True)]
    assert "ratio to 1 thread, idle: auto, beside a busy process" in out
    assert "1.50x" in out and len(results) == 5


@pytest.mark.slow
def test_profile_prints_the_top_operators_and_the_host_side_counts(capsys):
    bench.main(
        ["--small", "--iters", "1", "--student-steps", "1", "--batch-size", "32"]
        + ["--device", "cpu", "--threads", "1", "--profile"]
    )
    out = capsys.readouterr().out
    assert "profile of one fast-path iteration, top 15 by self_cpu_time_total:" in out
    calls = re.search(r"host-side counts per iteration: operator calls (\d+) \(CPU\)", out)
    assert calls and int(calls.group(1)) > 100
    split = re.search(r"convolutions and matmuls ([\d.]+) ms \(([\d.]+)%\), other operators", out)
    assert split and float(split.group(1)) > 0 and 0 < float(split.group(2)) < 100
    ceiling = float(re.search(r"the iteration would run ([\d.]+)x faster", out).group(1))
    speedup = float(re.search(r"speed-up of fast over published-style: ([\d.]+)x", out).group(1))
    best = re.search(r"with those other operators free: ([\d.]+)x the published-style path", out)
    assert best and float(best.group(1)) == pytest.approx(speedup * ceiling, rel=0.02)


def test_the_achieved_rate_is_the_median_of_each_iterations_own_rate():
    assert timing.iteration_flops([2.0, 3.0, 5.0], 10.0, 3.0, 2.0) == [8.0, 10.0, 14.0]
    distiller = SimpleNamespace(
        schedule=SimpleNamespace(student_steps=1, batch_size=4),
        meter=SimpleNamespace(sums={"selection/batches_used": 9.0}),
    )
    stats = SimpleNamespace(
        distiller=distiller,
        device=torch.device("cpu"),
        # iterations of 2, 3 and 5 batches; the slowest did the most work
        seconds=[1.0, 1.0, 2.0],
        batch_counts=[2.0, 3.0, 5.0],
        flops_per_iteration=10.0,
        counted_batches=3.0,
        flops_per_scored_batch=2.0,
        selection_seconds=0.0,
        peak_bytes=0,
    )
    figures = timing.PathStats.figures(stats, {"bf16": 1e12})
    assert figures["s_per_iter"] == 1.0  # the median time
    assert figures["tflop_per_iter"] * 1e12 == pytest.approx(32.0 / 3)
    # rates 8, 10 and 7 FLOP/s: their median, not the mean work over the median time (10.7)
    assert figures["tflops"] * 1e12 == pytest.approx(8.0)
    assert figures["matmul_share_bf16"] == pytest.approx(100 * 8.0 / 1e12)


def small_spec(name: str, published: bool = False, **changes) -> processes.PathSpec:
    """The digits setting at batch 32 and one student step, as a path's process builds it."""
    overrides = ["runtime.device=cpu", "trainer.batch_size=32", "trainer.student_steps=1"]
    cfg = setting.bench_config(overrides + (published_path.PUBLISHED_STYLE if published else []))
    if published:
        published_path.published_style(cfg)
    fields = {"threads": 1, "keep_freed_memory": not published, "device": "cpu", **changes}
    return processes.PathSpec(name=name, cfg=cfg, published=published, seed=0, **fields)


def test_each_path_runs_in_a_process_of_its_own_under_its_malloc_policy_and_threads():
    glibc = runtime.glibc_version() is not None
    specs = [small_spec("fast", threads=1), small_spec("published-style", True, threads=2)]
    with processes.PathProcess(specs[0]) as fast, processes.PathProcess(specs[1]) as published:
        assert fast.description["malloc"] == (
            "keeps freed memory" if glibc else "not glibc (nothing set)"
        )
        assert published.description["malloc"] == (
            "its own policy" if glibc else "not glibc (nothing set)"
        )
        for path, spec in ((fast, specs[0]), (published, specs[1])):
            assert path.description["threads"] == spec.threads
            # numpy's BLAS (which scikit-learn's mixture uses) held to the same count
            assert set(path.description["blas_threads"]) == {spec.threads}
        timing.time_paths({"fast": fast, "published-style": published}, 1)
        figures = published.figures({"fp32": 1e12, "bf16": 2e12})
        assert figures["s_per_iter"] > 0 and figures["tflop_per_iter"] > 0
        text, dense_share = fast.profile()
        assert "operator calls" in text and 0 < dense_share < 1
    assert fast._process.exitcode == 0 and published._process.exitcode == 0  # asked to end


def test_a_paths_process_sends_back_a_users_mistake_as_itself_and_a_crash_with_its_trace():
    spec = small_spec("fast")
    spec.cfg.selection.threshold = 2.0  # past the config's check: found when the path is built
    with pytest.raises(UserError, match=r"selection.threshold=2.0 is outside \(0, 1\)"):
        processes.PathProcess(spec)
    crash = r"the benchmark's fast path failed in its process:\nTraceback(.|\n)*nonsense"
    with pytest.raises(RuntimeError, match=crash):
        processes.PathProcess(small_spec("fast", device="nonsense"))
    assert multiprocessing.active_children() == []  # both processes ended


def test_a_path_whose_process_died_is_an_error_not_a_hang():
    path = processes.PathProcess(small_spec("fast"))
    path._process.kill()
    path._process.join()
    with pytest.raises(RuntimeError, match="the benchmark's fast path process ended without an"):
        path.time_iteration()
    path.close()


def test_the_dense_operators_are_convolutions_and_matmuls_of_every_backend():
    dense = ["aten::mkldnn_convolution", "aten::convolution_backward", "aten::cudnn_convolution"]
    assert all(timing.is_dense(name) for name in [*dense, "aten::addmm", "aten::mm"])
    other = ["aten::native_batch_norm", "aten::upsample_nearest2d", "aten::copy_", "aten::sum"]
    assert not any(timing.is_dense(name) for name in other)


@pytest.mark.gpu
def test_on_a_gpu_the_fast_path_beats_the_published_style_path_on_cifar(capsys):
    figures = bench.main(["--iters", "2", "--student-steps", "2", "--batch-size", "256"])
    assert figures["fast"]["s_per_iter"] < figures["published-style"]["s_per_iter"]
    assert figures["fast"]["peak_gib"] > 0


def test_the_published_style_path_differs_only_through_its_seam_and_settings():
    # unfolded, so that loading trained weights into the teacher reaches its scoring forward
    cfg = setting.bench_config(
        ["runtime.device=cpu", "trainer.batch_size=64", "speed.fold_teacher_bn=false"]
    )
    published_cfg = setting.bench_config(
        ["runtime.device=cpu", "trainer.batch_size=64", *published_path.PUBLISHED_STYLE]
    )
    cpu = torch.device("cpu")
    fast = setting.build_path(cfg, cpu, published=False, seed=0).synthesizer
    published = setting.build_path(published_cfg, cpu, published=True, seed=0).synthesizer
    assert isinstance(published.scorer, published_path.PublishedStyleScorer)
    assert not published.adaptive_rounds and published.precision.name == "fp32"
    # speed.refill=auto refills a CPU's student batches one batch a round, as published
    assert not fast.adaptive_rounds and fast.scorer == fast.score
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


def test_the_published_style_path_computes_the_bn_statistics_the_references_way():
    overrides = ["runtime.device=cpu", *published_path.PUBLISHED_STYLE]
    cfg = published_path.published_style(setting.bench_config(overrides))
    distiller = setting.build_path(cfg, torch.device("cpu"), published=True, seed=0)
    term = distiller.objective.terms["bn"]
    assert term.statistic is published_path.published_bn_statistics_term
    assert not distiller.synthesizer.generator.depthwise_output
    # a method without the term is left as it is
    dafl = setting.bench_config([*overrides, "method=dafl"])
    assert published_path.published_style(dafl.copy()) == dafl


def test_agreement_measures_what_the_speed_settings_leave_unchanged(capsys, kernel_calls):
    shares = bench.main(["--agreement", "--small", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "teacher digits_cnn (digits_cnn), generator untrained, 4096 generated samples" in out
    assert shares["fold_teacher_bn=true"] >= 0.999  # float rounding only
    assert shares["depthwise_output=true"] >= 0.999  # float rounding only
    assert 0.5 < shares["scoring=bf16"] <= 1.0
    # the C kernels' settings are variants of their own where the kernels build
    built = kernels.kernels() is not None
    assert ("generation=bf16, fused_generation=true" in shares) == built
    assert ("fold_teacher_bn=true, single_channel_conv=true" in shares) == built
    assert ("fold_teacher_bn=true, winograd_conv=true" in shares) == built
    assert ("fold_teacher_bn=true, winograd_conv=true, winograd_tile=2" in shares) == built
    if built:  # float rounding only; at one thread, where the kernels ran
        assert shares["fold_teacher_bn=true, single_channel_conv=true"] >= 0.999
        assert shares["fold_teacher_bn=true, winograd_conv=true"] >= 0.999
        assert shares["fold_teacher_bn=true, winograd_conv=true, winograd_tile=2"] >= 0.999
        kernels_run = {"single_channel_conv", "affine_leaky_relu_upsample", "winograd_conv3x3"}
        assert kernels_run <= set(kernel_calls)
    assert "kept by the reference (fp32, unfolded), one CPU thread" in out
    assert re.search(
        r"\nscoring=bf16: \d+\.\d\d% of the keep decisions unchanged, \d+\.\d% kept\n", out
    )
    # for scale, how often the published fit agrees with itself from another random start
    assert 0.5 < shares["published fit, another start"] <= 1.0
    assert 0.5 < shares["this fit against the published fit"] <= 1.0
    assert "the published fit from 4 random starts, on the reference's scores" in out


def test_the_agreement_reference_stays_fp32_whatever_set_gives_the_scoring_and_generator():
    from omegaconf import OmegaConf

    from tadfkd.bench import agreement

    cfg = setting.bench_config([*setting.SETTINGS["small"], "speed.scoring=bf16"])
    cfg.speed.generation = "bf16"
    found = agreement.variants(cfg, torch.device("cpu"))

    def merged(name: str):
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(found[name])).speed

    assert (merged(agreement.REFERENCE).scoring, merged(agreement.REFERENCE).generation) == (
        "fp32",
        "fp32",
    )
    assert merged("scoring=bf16").scoring == "bf16" and merged("scoring=bf16").generation == "fp32"
    assert merged("generation=bf16").generation == "bf16"


@pytest.mark.slow
def test_two_checkouts_fast_paths_alternate_iteration_by_iteration(tmp_path, capsys):
    other = tmp_path / "other"  # a checkout of the same code: the package and its configs
    for part in ("tadfkd", "conf"):
        shutil.copytree(ROOT / part, other / part)
    line = bench_checkouts.main([str(other), "--setting", "small", "--pairs", "2"])
    assert line in capsys.readouterr().out
    found = re.search(
        r"2 pairs: this checkout ([0-9.]+) ms, .*other ([0-9.]+) ms \(medians; ([0-9.]+) and "
        r"([0-9.]+) generated batches per student step\); this checkout takes [-+][0-9.]+ ms",
        line,
    )
    assert found, line
    this_ms, other_ms, this_batches, other_batches = map(float, found.groups())
    assert this_ms > 0 and other_ms > 0
    assert this_batches == other_batches >= 1  # the same code from the same seeds: same work


def test_a_folder_that_is_no_checkout_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_checkouts.main([str(tmp_path)])
    assert stopped.value.code == 2
    assert "is not a checkout of tadfkd" in capsys.readouterr().err


def test_a_checkout_whose_fast_path_cannot_start_is_one_sentence(tmp_path):
    # a checkout older than the worker's needs: its setting module lacks build_path
    (tmp_path / "tadfkd" / "bench").mkdir(parents=True)
    (tmp_path / "tadfkd" / "bench" / "setting.py").write_text("SETTINGS = {}\n")
    with pytest.raises(UserError, match=r"^the fast path of .* stopped \(exit code 1\); its "):
        bench_checkouts.main([str(tmp_path), "--setting", "small", "--pairs", "1"])
