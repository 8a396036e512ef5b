"""Config composition: every option of every group composes, resolves and builds."""

import pytest
from conftest import compose_config, options
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tadfkd.models import ARCHITECTURES

CONTRACT = [
    "trainer.epochs",
    "trainer.iters_per_epoch",
    "trainer.student_steps",
    "trainer.batch_size",
    "selection",
    "teacher.checkpoint",
    "teacher.arch",
    "method",
    "logger",
    "seed",
    "device",
]


def resolved(cfg):
    """The job's config with every interpolation resolved (the hydra node left out)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    job = OmegaConf.create(container)
    OmegaConf.resolve(job)
    return job


def test_default_config_has_the_contract_names_and_values():
    cfg = compose_config()
    for key in CONTRACT:
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.trainer.iters_per_epoch == 36 and cfg.trainer.student_steps == 10
    assert cfg.selection.threshold == 0.5 and cfg.device == "auto"
    assert cfg.dataset.name == "digits" and cfg.method.name == "tadfkd"
    assert cfg.logger.mode == "offline"
    assert cfg.hydra.job.chdir is False


@pytest.mark.parametrize(
    "group",
    ["dataset", "teacher", "student", "generator", "selection", "optimizer", "method", "logger"],
)
def test_every_option_of_every_group_composes_and_resolves(group):
    for option in options(group):
        cfg = resolved(compose_config([f"{group}={option}"]))
        assert cfg[group] is not None, f"{group}={option}"


@pytest.mark.parametrize("option", options("student"))
def test_every_student_option_builds_a_registered_model(option):
    cfg = resolved(compose_config([f"student={option}"]))
    assert cfg.student.arch in ARCHITECTURES
    if not cfg.student.arch.startswith("tiny_"):
        model = instantiate(cfg.student)
        assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("option", options("method"))
def test_every_method_option_builds_its_objective(option):
    cfg = resolved(compose_config([f"method={option}"]))
    objective = instantiate(cfg.method)
    assert objective.name == cfg.method.name


def test_selection_options_build():
    for option in options("selection"):
        instantiate(resolved(compose_config([f"selection={option}"])).selection)


def test_basic_method_switches_selection_off():
    assert compose_config(["method=basic"]).selection._target_.endswith("NoSelection")
    assert compose_config(["method=tadfkd"]).selection._target_.endswith("GMMSelection")


def test_teacher_options_match_their_dataset_class_counts():
    datasets = {
        option: compose_config([f"dataset={option}"]).dataset for option in options("dataset")
    }
    for option in options("teacher"):
        teacher = resolved(compose_config([f"teacher={option}"])).teacher
        assert teacher.arch in ARCHITECTURES
        assert len(teacher.mean) == len(teacher.std) == teacher.in_channels
        assert teacher.num_classes in {d.num_classes for d in datasets.values()}


@pytest.mark.parametrize(
    ("experiment", "dataset", "epochs", "teacher_arch", "student_arch"),
    [
        ("cifar10", "cifar10", 200, "resnet34", "resnet18"),
        ("cifar100", "cifar100", 500, "resnet34", "resnet18"),
        # the published Tiny-ImageNet "ResNet18" has ResNet-34 depth
        ("tinyimagenet", "tinyimagenet", 500, "tiny_resnet34", "tiny_resnet34"),
    ],
)
def test_experiment_presets_reproduce_the_published_commands(
    experiment, dataset, epochs, teacher_arch, student_arch
):
    cfg = resolved(compose_config([f"experiment={experiment}"]))
    assert cfg.dataset.name == dataset
    assert cfg.trainer.epochs == epochs and cfg.trainer.batch_size == 1024
    assert cfg.trainer.iters_per_epoch == 36 and cfg.trainer.student_steps == 10
    assert cfg.teacher.arch == teacher_arch and cfg.student.arch == student_arch
    assert cfg.teacher.num_classes == cfg.dataset.num_classes
    assert cfg.generator.img_size == cfg.dataset.image_size and cfg.generator.nz == 1000
    assert cfg.optimizer.scheduler.T_max == epochs
    assert cfg.trainer.published_scheduler_offset  # stepped at each epoch's start, as published


def test_command_line_overrides_win_over_experiments():
    cfg = compose_config(["experiment=cifar10", "trainer.epochs=3", "selection.threshold=0.7"])
    assert cfg.trainer.epochs == 3 and cfg.selection.threshold == 0.7
    assert cfg.optimizer.scheduler.T_max == 3


def test_teacher_job_recipe_follows_the_dataset():
    digits = compose_config([], config_name="train_teacher")
    cifar = compose_config(["dataset=cifar10", "teacher=cifar10_resnet34_9546"], "train_teacher")
    assert digits.recipe.epochs < cifar.recipe.epochs == 200
    assert cifar.recipe.lr == 0.1 and cifar.recipe.momentum == 0.9
    assert cifar.recipe.weight_decay == 5e-4
