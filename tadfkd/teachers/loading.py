"""Loading teacher checkpoints safely, and saving the teachers we train.

A checkpoint is read with PyTorch's restricted unpickler (`weights_only=True`), so a file that
would run code when loaded is refused instead of executed. Accepted layouts: a raw state dict,
`{'state_dict': sd}` (CMI / Fast-DFKD zoo), `{'model': sd}`, each optionally with the `module.`
prefix of DataParallel. Every mistake a user can make with a file is reported as a one-sentence
`UserError` naming the file and the fix.
"""

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tadfkd.base.errors import UserError
from tadfkd.base.files import replace_atomically, write_json
from tadfkd.models import ARCHITECTURES, build_classifier, classifier_layer, module_path

RESAVE_HINT = "re-save its weights with torch.save(model.state_dict(), 'teacher.pt')"


def check_teacher_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a regular file, else a one-sentence ``UserError``."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"teacher checkpoint {path} does not exist; "
            "put the file there or set teacher.checkpoint=/path/to/file.pt"
        )
    if path.is_dir():
        raise UserError(
            f"teacher checkpoint {path} is a directory; set teacher.checkpoint to the .pt file"
        )
    if not path.is_file():  # a FIFO or a device such as /dev/zero would be read forever
        raise UserError(
            f"teacher checkpoint {path} is not a regular file; set teacher.checkpoint to the "
            ".pt file"
        )
    return path


def teacher_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the teacher file at ``path`` (checked first): its identity."""
    return file_sha256(check_teacher_file(path))


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameter and buffer tensors stored in the checkpoint at `path`, on the CPU, with
    any `module.` prefix removed."""
    path = check_teacher_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a damaged file
        unsafe = _unsafe_globals(path, error)
        if unsafe:
            raise UserError(
                f"teacher checkpoint {path} was refused because loading it would run code "
                f"({', '.join(unsafe[:3])}); load it where that code is available and "
                f"{RESAVE_HINT}"
            ) from None
        raise UserError(
            f"teacher checkpoint {path} is corrupted, truncated or not a PyTorch file "
            f"({type(error).__name__}); copy or download it again"
        ) from None
    state_dict = _unwrap(loaded)
    if state_dict is None:
        raise UserError(
            f"teacher checkpoint {path} holds a {type(loaded).__name__}, not a state dict of "
            f"named tensors; {RESAVE_HINT}"
        )
    if state_dict and all(key.startswith("module.") for key in state_dict):
        # Saved from a DataParallel wrapper.
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return state_dict


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """The Python objects (module.name) a checkpoint would import to unpickle; [] if none."""
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            # The user's own classes first: they say more than torch's module classes.
            return sorted(unsafe, key=lambda name: (name.startswith("torch."), name))
        except Exception:  # a damaged archive: reported as corrupted by the caller
            return []
    # Files in the legacy (non-zip) format: the restricted unpickler names the refused global.
    return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _unwrap(loaded: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside a loaded checkpoint, or None if there is none."""
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
        if loaded and all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in loaded.items()
        ):
            return dict(loaded)
    return None


def load_classifier(
    path: str | os.PathLike, arch: str, num_classes: int, in_channels: int, freeze: bool = True
) -> nn.Module:
    """Builds `arch` and loads the checkpoint at `path` into it strictly.

    Returns the model in eval mode, with `requires_grad=False` on every parameter if `freeze`.
    """
    state_dict = read_state_dict(path)
    model = build_classifier(arch, num_classes, in_channels)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        raise UserError(_architecture_mismatch(path, arch, state_dict, missing, unexpected))
    head = f"{module_path(model, classifier_layer(model))}.weight"
    file_classes = state_dict[head].shape[0]
    if file_classes != num_classes:
        raise UserError(
            f"teacher checkpoint {path} has {file_classes} classes but "
            f"teacher.num_classes/dataset has {num_classes}; use a teacher trained on this "
            "dataset or set teacher.num_classes to match"
        )
    file_channels = state_dict[f"{_first_conv_name(model)}.weight"].shape[1]
    if file_channels != in_channels:
        raise UserError(
            f"teacher checkpoint {path} takes {file_channels} input channels but "
            f"teacher.in_channels is {in_channels}; use a teacher for this dataset or set "
            f"teacher.in_channels={file_channels} with one mean and std per channel"
        )
    wrong_shape = [key for key in expected if state_dict[key].shape != expected[key].shape]
    if wrong_shape:
        key = wrong_shape[0]
        raise UserError(
            f"teacher checkpoint {path} does not fit architecture {arch} ({key} has shape "
            f"{tuple(state_dict[key].shape)} in the file but {tuple(expected[key].shape)} in "
            f"the model){_guess(_matching_architectures(state_dict))}"
        )
    for key, tensor in state_dict.items():
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise UserError(
                f"teacher checkpoint {path} stores {key} as {tensor.dtype}, not floating point; "
                f"{RESAVE_HINT}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"teacher checkpoint {path} holds NaN or infinite values in {key}, so it cannot "
                "teach; use a teacher whose training did not diverge"
            )
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    if freeze:
        model.requires_grad_(False)
    return model


def _first_conv_name(model: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if isinstance(module, nn.Conv2d))


def _architecture_mismatch(
    path: str | os.PathLike,
    arch: str,
    state_dict: Mapping[str, torch.Tensor],
    missing: Sequence[str],
    unexpected: Sequence[str],
) -> str:
    """One sentence: how the file's keys differ from `arch`, and what to do about it."""
    details = [
        f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''} such as {', '.join(keys[:3])}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected))
        if keys
    ]
    matches = _matching_architectures(state_dict)
    fix = _guess(matches)
    if len(missing) + len(unexpected) <= 3 and not matches:
        # A near miss: the right architecture, saved incompletely or from an edited model.
        fix = f"; re-save the complete state dict of an unedited {arch}"
    return (
        f"teacher checkpoint {path} does not fit architecture {arch} ({' and '.join(details)}){fix}"
    )


def _guess(matches: Sequence[str]) -> str:
    """'; it looks like X, so set teacher.arch=X', or a list of the known architectures."""
    if not matches:
        known = ", ".join(sorted(ARCHITECTURES))
        return (
            "; it matches none of the known architectures, so set teacher.arch to the one it "
            f"was trained with (known: {known})"
        )
    return f"; it looks like {' or '.join(matches)}, so set teacher.arch={matches[0]}"


def _matching_architectures(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered architectures whose keys and shapes match the file, up to the class count
    and the input channels."""
    return [name for name, factory in ARCHITECTURES.items() if _same_layout(factory, state_dict)]


def _same_layout(factory: Callable[..., nn.Module], state_dict: Mapping[str, torch.Tensor]) -> bool:
    # On the meta device: shapes without allocating or initialising the weights.
    with torch.device("meta"):
        model = factory(num_classes=1, in_channels=1)
    expected = model.state_dict()
    if expected.keys() != state_dict.keys():
        return False
    head = module_path(model, classifier_layer(model))
    free_dim = {f"{head}.weight": 0, f"{head}.bias": 0, f"{_first_conv_name(model)}.weight": 1}
    for key, tensor in expected.items():
        shape, file_shape = list(tensor.shape), list(state_dict[key].shape)
        if key in free_dim and len(shape) == len(file_shape):
            # Class count and input channels are free: compare the other dimensions.
            del shape[free_dim[key]], file_shape[free_dim[key]]
        if shape != file_shape:
            return False
    return True


def save_teacher(
    model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """Writes `model`'s state dict (plain CPU tensors) to `path` and `metadata` plus the file's
    sha256 to `path` with suffix `.json` beside it.

    `metadata` should hold arch, num_classes, mean, std, test_acc (fraction), recipe and seed.
    Returns the metadata as written, with `sha256` added.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    # Write then rename, so that an interrupted save never leaves a truncated teacher behind.
    replace_atomically(path, lambda temporary: torch.save(state_dict, temporary))
    written = {**metadata, "sha256": file_sha256(path)}
    write_json(path.with_suffix(".json"), written, sort_keys=True)
    return written


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata written beside the checkpoint at `path` by `save_teacher`, or None if
    there is no `.json` file beside it."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        return json.loads(meta_path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"teacher metadata {meta_path} is not text; fix it or delete it") from None
    except json.JSONDecodeError as error:
        raise UserError(
            f"teacher metadata {meta_path} is not valid JSON ({error.msg} at line "
            f"{error.lineno}); fix it or delete it"
        ) from None


def check_trained_on(checkpoint: str | os.PathLike, dataset: str, name: str) -> None:
    """Refuse a teacher whose metadata (``save_teacher``'s file beside ``checkpoint``) says it
    was trained on another dataset than ``dataset``; a teacher without readable metadata, or
    whose metadata names no dataset, passes (files from elsewhere have none)."""
    try:
        metadata = read_metadata(checkpoint)
    except (UserError, OSError):
        return
    trained_on = metadata.get("dataset") if isinstance(metadata, dict) else None
    if isinstance(trained_on, str) and trained_on != dataset:
        raise UserError(
            f"teacher {name} was trained on {trained_on} (its metadata "
            f"{Path(checkpoint).with_suffix('.json')}), not on dataset {dataset}; pick a "
            f"teacher of {dataset}, or set runtime.check_teacher_dataset=false to distil it "
            "all the same."
        )


@dataclass
class Teacher:
    """A frozen, loaded teacher and the normalisation it was trained with (per channel)."""

    model: nn.Module
    arch: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    checkpoint: str
    name: str
    sha256: str = ""  # of the checkpoint file: the teacher's identity, wherever the file lies


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_teacher(
    checkpoint: str,
    arch: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    name: str = "",
) -> Teacher:
    """Loads a frozen teacher (eval mode, no gradients); `name` defaults to the file's stem.

    `mean` and `std` (one value per input channel, for images in [0, 1]) may be Hydra
    ListConfigs.
    """
    mean_tuple = tuple(float(value) for value in mean)
    std_tuple = tuple(float(value) for value in std)
    for label, values in (("mean", mean_tuple), ("std", std_tuple)):
        if len(values) != in_channels:
            raise UserError(
                f"teacher.{label} has {len(values)} values but the teacher takes {in_channels} "
                f"input channels; give one {label} per channel"
            )
    model = load_classifier(checkpoint, arch, num_classes, in_channels, freeze=True)
    return Teacher(
        model=model,
        arch=arch,
        num_classes=num_classes,
        mean=mean_tuple,
        std=std_tuple,
        checkpoint=str(checkpoint),
        name=name or Path(checkpoint).stem,
        sha256=file_sha256(checkpoint),
    )


def random_teacher(node: Mapping[str, Any]) -> Teacher:
    """The architecture of a teacher option (``arch``, ``num_classes``, ``in_channels``,
    ``mean``, ``std``) with random weights, frozen: for benchmarks and tests (no file)."""
    model = build_classifier(node["arch"], int(node["num_classes"]), int(node["in_channels"]))
    return Teacher(
        model=model.eval().requires_grad_(False),
        arch=node["arch"],
        num_classes=int(node["num_classes"]),
        mean=tuple(float(value) for value in node["mean"]),
        std=tuple(float(value) for value in node["std"]),
        checkpoint="(random weights)",
        name=f"random_{node['arch']}",
    )
