"""The teacher zoo: every architecture loads from every published file layout through the real
`teacher=` options, the teacher job names each sweep job's file, the shipped digits and
Fashion-MNIST teachers match their metadata and the README's tables, and a run without a test
set trains unevaluated."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import ROOT, compose_config, dataset_source, options, run_entry
from hydra.utils import instantiate

from tadfkd.data.loading import load_split, make_loader
from tadfkd.distillation.evaluation import evaluate
from tadfkd.models import ARCHITECTURES, build_classifier
from tadfkd.run.teacher_job import output_path
from tadfkd.teachers.loading import Teacher, read_metadata

CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
CMI_ZOO = [
    f"{dataset}_{arch}"
    for dataset in ("cifar10", "cifar100")
    for arch in ("resnet34", "vgg11", "wrn40_2")
]
# Published layouts: TA-DFKD's raw state dict, the CMI / Fast-DFKD zoo's {'state_dict': ...},
# each as saved from a plain model or from a DataParallel wrapper (`module.` prefix).
LAYOUTS = ["raw", "raw_module", "cmi", "cmi_module"]
TINY = ["debug=tiny", "trainer.iters_per_epoch=1", "trainer.student_steps=1"]


def run(*overrides: str):
    return run_entry(*overrides)


def option_for(arch: str) -> tuple[str, list[str]]:
    """The `teacher=` option shipped for `arch`, else a same-dataset option with
    `teacher.arch=` overridden (the way a user loads any other file)."""
    shipped = {
        "resnet34": "cifar10_resnet34",
        "vgg11": "cifar10_vgg11",
        "wrn40_2": "cifar10_wrn40_2",
        "tiny_resnet34": "tiny_resnet34_7550",
        "digits_cnn": "digits_cnn",
        "digits_cnn_w": "digits_cnn_w",
        "digits_resnet": "digits_resnet",
    }
    if arch in shipped:
        return shipped[arch], []
    base = "tiny_resnet34_7550" if arch.startswith("tiny_") else "cifar10_resnet34"
    if arch.startswith("digits_"):
        base = "digits_cnn"
    return base, [f"teacher.arch={arch}"]


@pytest.fixture(scope="module")
def random_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """One randomly initialised state dict per (architecture, option) pair, built lazily."""
    return {}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_loads_from_every_published_layout(
    tmp_path, random_state_dicts, arch, layout
):
    option, overrides = option_for(arch)
    cfg = compose_config([f"teacher={option}", *overrides], "config").teacher
    if arch not in random_state_dicts:
        torch.manual_seed(0)
        model = build_classifier(arch, int(cfg.num_classes), int(cfg.in_channels))
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.uniform_(0.5, 1.5)  # so that a bit-exact reload is a real check
        random_state_dicts[arch] = model.state_dict()
    state = random_state_dicts[arch]
    saved = (
        {f"module.{key}": value for key, value in state.items()} if "module" in layout else state
    )
    path = tmp_path / ("teacher.pth" if layout.startswith("cmi") else "teacher.pt")
    torch.save({"state_dict": saved, "epoch": 199} if layout.startswith("cmi") else saved, path)
    cfg = compose_config([f"teacher={option}", *overrides, f"teacher.checkpoint={path}"])
    teacher = instantiate(cfg.teacher)
    assert isinstance(teacher, Teacher) and teacher.arch == arch
    loaded = teacher.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("option", CMI_ZOO)
def test_cmi_zoo_options_name_the_zoo_file_and_its_normalisation(option):
    dataset, _, arch = option.partition("_")
    teacher = compose_config([f"teacher={option}"]).teacher
    folder = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}[dataset]
    assert teacher.checkpoint.endswith(f"Pretrained_Teachers/{folder}/{option}.pth")
    assert teacher.arch == arch and teacher.name == option
    assert teacher.num_classes == {"cifar10": 10, "cifar100": 100}[dataset]
    mean, std = (
        (CIFAR10_MEAN, CIFAR10_STD) if dataset == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    )
    assert list(teacher.mean) == mean and list(teacher.std) == std
    text = (ROOT / "conf" / "teacher" / f"{option}.yaml").read_text()
    assert re.search(r"reference accuracy is \d+\.\d+%", text)


def test_any_file_loads_with_checkpoint_and_arch_overrides(tmp_path):
    path = tmp_path / "my_wrn.pt"
    torch.manual_seed(0)
    torch.save(build_classifier("wrn16_2", 100, 3).state_dict(), path)
    cfg = compose_config(
        ["teacher=cifar100_wrn40_2", f"teacher.checkpoint={path}", "teacher.arch=wrn16_2"]
    )
    teacher = instantiate(cfg.teacher)
    assert teacher.arch == "wrn16_2" and teacher.checkpoint == str(path)


@pytest.mark.slow
def test_a_file_given_on_the_command_line_is_named_after_itself(tmp_path):
    path = tmp_path / "my_wide_cnn.pt"
    torch.manual_seed(0)
    torch.save(build_classifier("digits_cnn_w", 10, 1).state_dict(), path)
    result = run(
        *TINY,
        "trainer.batch_size=16",
        f"teacher.checkpoint={path}",
        "teacher.arch=digits_cnn_w",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher my_wide_cnn (digits_cnn_w)" in result.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["teacher"] == "my_wide_cnn"


# -- the teacher job ------------------------------------------------------------------------


def teacher_job(*overrides: str):
    return compose_config(list(overrides), "train_teacher")


def test_teacher_option_alone_writes_the_file_it_loads():
    cfg = teacher_job("teacher=digits_cnn_w")
    assert output_path(cfg, ["teacher=digits_cnn_w"]) == Path(cfg.teacher.checkpoint)


def test_variant_overrides_name_the_file():
    overrides = ["teacher=digits_cnn", "seed=1", "recipe.label_smoothing=0.1"]
    path = output_path(teacher_job(*overrides), overrides)
    assert path.name == "digits_cnn_seed1_label_smoothing0p1.pt"
    assert path.parent.name == "digits"
    overrides = ["output=/tmp/x.pt", "seed=3"]
    assert output_path(teacher_job(*overrides), overrides) == Path("/tmp/x.pt")


def test_each_zoo_option_is_the_file_of_its_documented_command():
    for option in [*DIGITS_ZOO, *FMNIST_ZOO]:
        first_lines = (ROOT / "conf" / "teacher" / f"{option}.yaml").read_text()
        command = re.search(r"`python -m tadfkd.train_teacher ([^`]+)`", first_lines)
        assert command, option
        overrides = command.group(1).split()
        cfg = teacher_job(*overrides)
        assert output_path(cfg, overrides) == Path(cfg.teacher.checkpoint).with_stem(option)


@pytest.mark.slow
def test_sweep_writes_one_file_per_job(tmp_path):
    result = run_entry(
        "-m",
        "teacher.arch=digits_cnn_s,digits_cnn",
        "seed=0,1",
        "recipe.epochs=1",
        f"paths.teachers={tmp_path / 'zoo'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        entry="-m tadfkd.train_teacher",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(path.name for path in (tmp_path / "zoo" / "digits").glob("*.pt"))
    assert written == [
        "digits_cnn_s_seed0_epochs1.pt",
        "digits_cnn_s_seed1_epochs1.pt",
        "digits_cnn_seed0_epochs1.pt",
        "digits_cnn_seed1_epochs1.pt",
    ]
    metadata = read_metadata(tmp_path / "zoo" / "digits" / "digits_cnn_s_seed1_epochs1.pt")
    assert metadata["arch"] == "digits_cnn_s" and metadata["seed"] == 1
    assert metadata["recipe"]["epochs"] == 1 and 0 <= metadata["test_acc"] <= 1


# -- the shipped zoos ---------------------------------------------------------------------------

DIGITS_ZOO = [option for option in options("teacher") if option.startswith("digits_")]
FMNIST_ZOO = [option for option in options("teacher") if option.startswith("fmnist_")]
# zoo -> (its options, its section of Pretrained_Teachers/README.md, its dataset)
ZOOS = {
    "digits": (DIGITS_ZOO, "## The digits zoo", "digits"),
    "fashion_mnist": (FMNIST_ZOO, "## The Fashion-MNIST zoo", "fashion_mnist"),
}
# Debian's dataset-fashion-mnist (`make data`), the last folder of conf/dataset/fashion_mnist.yaml
HAVE_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file()


def zoo_teacher(option: str):
    """The `teacher=` node of `option`, with paths under this repository."""
    return compose_config([f"teacher={option}", f"paths.root={ROOT}"]).teacher


def zoo_metadata(option: str) -> dict:
    metadata = read_metadata(zoo_teacher(option).checkpoint)
    assert metadata is not None, f"{option} has no .json metadata beside its checkpoint"
    return metadata


def readme_table(heading: str) -> dict[str, dict[str, str]]:
    """Rows of a zoo's table in Pretrained_Teachers/README.md (the first table under
    ``heading``), by option."""
    text = (ROOT / "Pretrained_Teachers" / "README.md").read_text()
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    table = section[section.index("\n|") + 1 :].split("\n\n", 1)[0]  # the first table
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(
            zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)
        )
        rows[cells["option"].strip("`")] = cells
    return rows


def variant(metadata: dict) -> tuple:
    recipe = metadata["recipe"]
    return (
        metadata["arch"],
        metadata["seed"],
        recipe["epochs"],
        recipe["label_smoothing"],
        recipe["augment"],
        recipe.get("erase", 0.0),
    )


def test_digits_zoo_is_varied_and_sweepable():
    assert len(DIGITS_ZOO) >= 6
    metadata = [zoo_metadata(option) for option in DIGITS_ZOO]
    assert len({variant(m) for m in metadata}) == len(DIGITS_ZOO)
    assert len({m["arch"] for m in metadata}) >= 3
    assert all(0.95 <= m["test_acc"] < 1 for m in metadata)


def test_fashion_mnist_zoo_differs_as_real_teachers_do():
    assert len(FMNIST_ZOO) >= 8
    metadata = [zoo_metadata(option) for option in FMNIST_ZOO]
    assert len({variant(m) for m in metadata}) == len(FMNIST_ZOO)
    assert len({m["arch"] for m in metadata}) >= 4
    assert {m["dataset"] for m in metadata} == {"fashion_mnist"}
    recipes = [m["recipe"] for m in metadata]
    assert any(r["label_smoothing"] > 0 for r in recipes)
    assert any(not r["augment"] for r in recipes)
    assert any(r.get("erase", 0) > 0 for r in recipes)  # strong augmentation
    assert len({r["epochs"] for r in recipes}) >= 2  # short training
    accuracies = [m["test_acc"] for m in metadata]
    assert 0.80 <= min(accuracies) and max(accuracies) <= 0.96
    assert max(accuracies) - min(accuracies) >= 0.03  # they differ


@pytest.mark.parametrize("option", DIGITS_ZOO)
def test_digits_teacher_has_the_accuracy_of_its_metadata(option):
    teacher = instantiate(zoo_teacher(option))
    metadata = zoo_metadata(option)
    assert metadata["arch"] == teacher.arch and metadata["mean"] == list(teacher.mean)
    assert metadata["sha256"] == teacher.sha256
    test_set = load_split(dataset_source("digits"), "test", mean=teacher.mean, std=teacher.std)
    accuracy = evaluate(
        teacher.model, make_loader(test_set, 1024, shuffle=False), torch.device("cpu")
    )
    assert accuracy == pytest.approx(metadata["test_acc"], abs=1e-9)


@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Fashion-MNIST is not installed (make data)")
@pytest.mark.parametrize("option", [o for o in FMNIST_ZOO if "vgg" not in o and "wrn" not in o])
def test_fashion_mnist_teacher_has_the_accuracy_of_its_metadata(option):
    # The two slow architectures are left out: a minute each on a CPU.
    teacher = instantiate(zoo_teacher(option))
    metadata = zoo_metadata(option)
    assert metadata["sha256"] == teacher.sha256
    test_set = load_split(
        dataset_source("fashion_mnist", "data"), "test", mean=teacher.mean, std=teacher.std
    )
    accuracy = evaluate(
        teacher.model, make_loader(test_set, 1000, shuffle=False), torch.device("cpu")
    )
    assert accuracy == pytest.approx(metadata["test_acc"], abs=1e-9)


def test_the_fashion_mnist_ceiling_is_documented_and_measured():
    path = ROOT / "Pretrained_Teachers" / "fashion_mnist" / "ceiling_digits_cnn_s.pt"
    metadata = read_metadata(path)
    assert metadata["arch"] == "digits_cnn_s" and metadata["dataset"] == "fashion_mnist"
    assert metadata["recipe"] == zoo_metadata("fmnist_cnn")["recipe"]  # the same recipe
    assert compose_config(["experiment=fashion_mnist"]).student.arch == metadata["arch"]
    text = (ROOT / "Pretrained_Teachers" / "README.md").read_text()
    assert f"| {100 * metadata['test_acc']:.2f} | `{metadata['command']}` |" in text


@pytest.mark.parametrize("zoo", ZOOS)
def test_readme_table_matches_the_metadata(zoo):
    zoo_options, heading, dataset = ZOOS[zoo]
    rows = readme_table(heading)
    assert sorted(rows) == sorted(zoo_options)
    for option, row in rows.items():
        metadata = zoo_metadata(option)
        assert metadata["dataset"] == dataset
        assert row["arch"] == metadata["arch"], option
        assert int(row["seed"]) == metadata["seed"], option
        assert row["test accuracy (%)"] == f"{100 * metadata['test_acc']:.2f}", option
        command = row["command"].strip("`")
        if "command" in metadata:
            assert command == metadata["command"], option
        assert command.startswith("python -m tadfkd.train_teacher ")


# -- a run without a test set ----------------------------------------------------------------


def cifar_run_without_data(tmp_path: Path, *overrides: str):
    teacher = tmp_path / "wrn16_1.pt"
    torch.manual_seed(0)
    torch.save(build_classifier("wrn16_1", 10, 3).state_dict(), teacher)
    return run(
        "experiment=cifar10",
        *TINY,
        "teacher.arch=wrn16_1",
        "student=wrn16_1",
        f"teacher.checkpoint={teacher}",
        f"paths.data={tmp_path / 'empty'}",
        "runtime.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    )


@pytest.mark.slow
def test_missing_test_set_trains_unevaluated_when_not_required(tmp_path):
    result = cifar_run_without_data(tmp_path, "runtime.require_test_set=false")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "CIFAR-10 not found" in notes[0]
    assert "runtime.require_test_set=false" in notes[0]
    assert "done: trained without a test set, so no accuracy was measured" in result.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("student_final_acc", "student_best_acc", "student_last10_acc", "teacher_acc"):
        assert results[key] is None, key
    assert results["epoch_accs"] == [None]


def test_missing_test_set_stays_an_error_by_default(tmp_path):
    assert compose_config().runtime.require_test_set
    result = cifar_run_without_data(tmp_path)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: CIFAR-10 not found") and "Traceback" not in result.stderr
