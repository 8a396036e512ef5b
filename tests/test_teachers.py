"""Teacher checkpoints: accepted layouts load bit-exact; every bad file is a one-sentence error."""

import hashlib
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tadfkd.base.errors import UserError
from tadfkd.models import build_classifier
from tadfkd.teachers.loading import (
    Teacher,
    load_classifier,
    load_teacher,
    read_metadata,
    read_state_dict,
    save_teacher,
)


class Payload:
    """Unpickling this would call `open(marker, 'w')`, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Opaque:
    """An arbitrary class instance: unpickling it needs this module's code."""


def random_model(arch: str = "wrn16_1", num_classes: int = 10, in_channels: int = 3):
    torch.manual_seed(0)
    model = build_classifier(arch, num_classes, in_channels)
    # Non-default BN statistics, so that a bit-exact reload is a real check.
    for name, tensor in model.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            tensor.uniform_(0.5, 1.5)
    return model


def raise_user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        call(*args, **kwargs)
    return str(error.value)


def assert_one_sentence(message: str, path: Path) -> None:
    """Names the file, one line, no sentence break (path removed first: it holds dots)."""
    assert str(path) in message
    rest = message.replace(str(path), "FILE")
    assert "\n" not in rest
    assert not re.search(r"[.!?]\s+[A-Z]", rest), rest


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model", "module_prefix", "legacy"])
def test_accepted_layouts_load_bit_exact(tmp_path, layout):
    model = random_model()
    state = model.state_dict()
    path = tmp_path / f"{layout}.pt"
    if layout == "raw":
        torch.save(state, path)
    elif layout == "state_dict":
        torch.save({"state_dict": state, "epoch": 199, "best_acc1": 0.9}, path)
    elif layout == "model":
        torch.save({"model": state}, path)
    elif layout == "module_prefix":
        torch.save({f"module.{key}": value for key, value in state.items()}, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_classifier(path, "wrn16_1", 10, 3)
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_unfrozen_classifier_keeps_gradients(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(random_model().state_dict(), path)
    model = load_classifier(path, "wrn16_1", 10, 3, freeze=False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("zip_format", [True, False])
def test_file_that_would_run_code_is_refused_without_running_it(tmp_path, zip_format):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    state = {"state_dict": random_model().state_dict(), "hook": Payload(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    message = raise_user_error(read_state_dict, path)
    assert "refused because loading it would run code" in message
    assert "builtins.open" in message or "io.open" in message
    assert "torch.save(model.state_dict()" in message
    assert_one_sentence(message, path)
    assert not marker.exists()


def test_pickled_class_instance_is_refused(tmp_path):
    path = tmp_path / "opaque.pt"
    torch.save({"weights": torch.zeros(2), "extra": Opaque()}, path)
    message = raise_user_error(read_state_dict, path)
    assert "refused because loading it would run code" in message
    assert "Opaque" in message
    assert_one_sentence(message, path)


def test_whole_pickled_model_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(random_model(), path)
    message = raise_user_error(load_classifier, path, "wrn16_1", 10, 3)
    assert "refused because loading it would run code" in message
    assert "WideResNet" in message
    assert_one_sentence(message, path)


def test_truncated_file(tmp_path):
    full, path = tmp_path / "full.pt", tmp_path / "truncated.pt"
    torch.save(random_model().state_dict(), full)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = raise_user_error(read_state_dict, path)
    assert "corrupted, truncated or not a PyTorch file" in message
    assert_one_sentence(message, path)


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"", b"hello world\n"])
def test_garbage_bytes(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    message = raise_user_error(read_state_dict, path)
    assert "corrupted, truncated or not a PyTorch file" in message
    assert_one_sentence(message, path)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"epoch": 3}, {}, torch.zeros(3)])
def test_not_a_state_dict(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    message = raise_user_error(read_state_dict, path)
    assert "not a state dict of named tensors" in message
    assert_one_sentence(message, path)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "teacher.pt"
    message = raise_user_error(load_teacher, str(path), "resnet18", 10, 3, [0.5] * 3, [0.5] * 3)
    assert message == (
        f"teacher checkpoint {path} does not exist; "
        "put the file there or set teacher.checkpoint=/path/to/file.pt"
    )


def test_directory_instead_of_file(tmp_path):
    message = raise_user_error(read_state_dict, tmp_path)
    assert "is a directory" in message
    assert_one_sentence(message, tmp_path)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teachers") / "cifar10_resnet18.pt"
    torch.save(random_model("resnet18").state_dict(), path)
    return path


@pytest.mark.parametrize("wrong_arch", ["wrn40_2", "resnet34", "tiny_resnet18", "vgg11"])
def test_wrong_architecture_names_file_arch_and_guess(resnet18_file, wrong_arch):
    message = raise_user_error(load_classifier, resnet18_file, wrong_arch, 10, 3)
    assert f"does not fit architecture {wrong_arch}" in message
    assert "it looks like resnet18, so set teacher.arch=resnet18" in message
    assert_one_sentence(message, resnet18_file)


def test_same_keys_different_widths_guessed_by_shape(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(random_model("digits_cnn_s", 10, 1).state_dict(), path)
    message = raise_user_error(load_classifier, path, "digits_cnn_w", 10, 1)
    assert "does not fit architecture digits_cnn_w" in message
    assert "has shape (8, 1, 3, 3) in the file but (32, 1, 3, 3) in the model" in message
    assert "it looks like digits_cnn_s" in message
    assert_one_sentence(message, path)


def test_wrong_class_count(tmp_path):
    path = tmp_path / "cifar100_wrn.pt"
    torch.save(random_model("wrn16_1", num_classes=100).state_dict(), path)
    message = raise_user_error(load_classifier, path, "wrn16_1", 10, 3)
    assert f"teacher checkpoint {path} has 100 classes but teacher.num_classes/dataset has 10" in (
        message
    )
    assert_one_sentence(message, path)


def test_wrong_input_channels(tmp_path):
    path = tmp_path / "rgb.pt"
    torch.save(random_model("digits_cnn", 10, 3).state_dict(), path)
    message = raise_user_error(load_classifier, path, "digits_cnn", 10, 1)
    assert "takes 3 input channels but teacher.in_channels is 1" in message
    assert_one_sentence(message, path)


def test_few_missing_and_unexpected_keys_are_listed(tmp_path):
    state = random_model().state_dict()
    state["fc.extra"] = state.pop("fc.bias")
    del state["bn1.running_var"]
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    message = raise_user_error(load_classifier, path, "wrn16_1", 10, 3)
    assert "2 missing keys such as bn1.running_var, fc.bias" in message
    assert "1 unexpected key such as fc.extra" in message
    assert "re-save the complete state dict of an unedited wrn16_1" in message
    assert_one_sentence(message, path)


def test_unknown_layout_lists_known_architectures(tmp_path):
    path = tmp_path / "mlp.pt"
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    torch.save(torch.nn.Sequential(*layers).state_dict(), path)
    message = raise_user_error(load_classifier, path, "resnet18", 10, 3)
    assert "122 missing keys" in message and "6 unexpected keys such as 0.weight" in message
    assert "matches none of the known architectures" in message
    assert "known: digits_cnn" in message
    assert_one_sentence(message, path)


def test_save_teacher_writes_metadata_beside_it(tmp_path):
    model = random_model()
    path = tmp_path / "teachers" / "digits" / "wrn.pt"
    assert read_metadata(path) is None
    metadata = {"arch": "wrn16_1", "num_classes": 10, "mean": [0.5], "std": [0.5], "seed": 1}
    written = save_teacher(model, path, {**metadata, "test_acc": 0.97, "recipe": {"lr": 0.1}})
    assert written["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_metadata(path) == written
    assert path.with_suffix(".json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["wrn.json", "wrn.pt"]
    loaded = load_classifier(path, "wrn16_1", 10, 3)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_broken_metadata_is_a_user_error(tmp_path):
    path = tmp_path / "t.pt"
    path.with_suffix(".json").write_text("{not json")
    message = raise_user_error(read_metadata, path)
    assert "is not valid JSON" in message
    assert_one_sentence(message, path.with_suffix(".json"))


def test_load_teacher_from_hydra_lists(tmp_path):
    path = tmp_path / "digits_cnn_w.pt"
    torch.save(random_model("digits_cnn_w", 10, 1).state_dict(), path)
    values = OmegaConf.create({"mean": [0.5], "std": [0.25]})
    teacher = load_teacher(str(path), "digits_cnn_w", 10, 1, values.mean, values.std)
    assert isinstance(teacher, Teacher)
    assert teacher.mean == (0.5,) and teacher.std == (0.25,)
    assert teacher.name == "digits_cnn_w" and teacher.checkpoint == str(path)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_load_teacher_checks_one_mean_per_channel(tmp_path):
    message = raise_user_error(
        load_teacher, str(tmp_path / "t.pt"), "resnet18", 10, 3, [0.5], [0.5, 0.5, 0.5]
    )
    assert message == (
        "teacher.mean has 1 values but the teacher takes 3 input channels; "
        "give one mean per channel"
    )
