"""The Fashion-MNIST benchmark's recipe (README.md, "The Fashion-MNIST benchmark"): the preset
composes with the schedule it was chosen with, the learning-rate schedule's length follows the
epochs, the GPU and the CPU sweeps run that same recipe, and the CPU sweep is the committed grid."""

import pytest
from helpers import ROOT, compose_config
from omegaconf import OmegaConf

# what was chosen on the development teacher (README.md): batch 64, 22 epochs of 36 iterations
RECIPE = {"batch_size": 64, "epochs": 22, "iters_per_epoch": 36, "student_steps": 10}


def test_the_preset_composes_with_the_chosen_recipe_and_development_teacher():
    cfg = compose_config(["experiment=fashion_mnist"])
    assert {key: cfg.trainer[key] for key in RECIPE} == RECIPE
    assert cfg.teacher.name == "fmnist_cnn" and cfg.student.arch == "digits_cnn_s"
    assert (cfg.generator.width, cfg.generator.nz, cfg.generator.img_size) == (32, 100, 28)


@pytest.mark.parametrize("epochs", [None, 7])
def test_the_schedule_length_follows_the_epochs(epochs):
    overrides = ["experiment=fashion_mnist"] + ([f"trainer.epochs={epochs}"] if epochs else [])
    cfg = compose_config(overrides)
    OmegaConf.resolve(cfg)
    assert cfg.optimizer.scheduler.T_max == cfg.trainer.epochs == (epochs or RECIPE["epochs"])


@pytest.mark.parametrize("preset", ["fashion_mnist", "fashion_mnist_cpu"])
def test_gpu_and_cpu_sweeps_run_the_same_recipe(preset):
    preset_cfg = compose_config([f"sweep={preset}"])
    single = compose_config(["experiment=fashion_mnist"])
    assert preset_cfg.trainer == single.trainer
    assert preset_cfg.generator == single.generator and preset_cfg.student == single.student


def test_the_cpu_sweep_is_the_committed_grid_and_relaunches_into_one_directory():
    cfg = compose_config(["sweep=fashion_mnist_cpu"])
    params = cfg.hydra.sweeper.params
    teachers = str(params.teacher).split(",")
    archs = {compose_config([f"teacher={t}"]).teacher.arch for t in teachers}
    assert len(teachers) >= 8 and len(archs) >= 4
    assert "fmnist_cnn" not in teachers  # the development teacher chose the recipe
    assert str(params.method).split(",") == ["tadfkd", "basic", "dfq", "dafl"]
    assert str(params.seed).split(",") == ["0", "1"]
    assert cfg.hydra.sweeper.max_batch_size == 2
    # no timestamp: the same command again finishes what an interrupted sweep left
    assert "${now:" not in OmegaConf.to_container(cfg.hydra.sweep)["dir"]
    assert (ROOT / "conf" / "sweep" / "fashion_mnist_cpu.yaml").exists()
