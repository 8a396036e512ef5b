"""Config composition: every option of every group composes, resolves and builds."""

import pytest
import torch
from helpers import compose_config, options
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from tadfkd.models import ARCHITECTURES
from tadfkd.run.checks import check_rules

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
    "runtime.device",
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
    assert cfg.selection.threshold == 0.5 and cfg.runtime.device == "auto"
    assert cfg.dataset.name == "digits" and cfg.method.name == "tadfkd"
    assert cfg.logger.mode == "offline"
    assert cfg.hydra.job.chdir is False


@pytest.mark.parametrize(
    "group",
    [
        "dataset",
        "teacher",
        "student",
        "generator",
        "selection",
        "optimizer",
        "method",
        "logger",
        "runtime",
    ],
)
def test_every_option_of_every_group_holds_valid_values(group):
    for option in options(group):
        cfg = resolved(compose_config([f"{group}={option}"]))
        check_rules(cfg, group)  # the value table of tadfkd.run.checks, as run.py applies it
        target = cfg[group].get("_target_")
        assert target is None or callable(get_object(target)), f"{group}={option}: {target}"


@pytest.mark.parametrize("option", options("student"))
def test_every_student_option_builds_a_model_with_logits_for_the_dataset(option):
    cfg = resolved(compose_config([f"student={option}"]))
    assert cfg.student.arch in ARCHITECTURES
    model = instantiate(cfg.student) if not cfg.student.arch.startswith("tiny_") else None
    if model is not None:  # the 64x64 Tiny-ImageNet nets are slow to run on a CPU
        logits = model(torch.randn(2, cfg.dataset.channels, 16, 16))
        assert logits.shape == (2, cfg.dataset.num_classes)


@pytest.mark.parametrize("option", options("method"))
def test_every_method_option_builds_its_objective(option):
    cfg = resolved(compose_config([f"method={option}"]))
    objective = instantiate(cfg.method)
    assert objective.name == cfg.method.name == option
    assert sum(term.weight for term in objective.terms.values()) > 0


def test_selection_options_build_and_select():
    logits = torch.randn(64, 10) * 3
    for option in options("selection"):
        selection = instantiate(resolved(compose_config([f"selection={option}"])).selection)
        keep = selection.keep_mask(logits, 32)
        assert keep.dtype == torch.bool and keep.shape == (64,)
        # GMM selection drops the high-loss samples of each batch; none keeps every sample
        assert bool(keep.all()) is (not selection.enabled)
        assert selection.max_batches >= 1


@pytest.mark.parametrize("experiment", [None, *options("experiment")])
def test_debug_tiny_shrinks_every_preset(experiment):
    preset = [f"experiment={experiment}"] if experiment else []
    cfg = compose_config([*preset, "debug=tiny"])
    assert cfg.trainer.epochs == 1 and cfg.trainer.iters_per_epoch == 2
    assert cfg.trainer.batch_size == 32 and cfg.runtime.num_workers == 0
    assert cfg.logger._target_.endswith("NullTracker")


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
