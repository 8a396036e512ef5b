"""Full-state checkpoints of a run: written atomically, verified before anything is unpickled.

A checkpoint file is ``MAGIC + sha256(payload) + payload``, where ``payload`` is ``torch.save``
of a dict of tensors and plain Python values, so that ``torch.load(weights_only=True)`` reads it
(RNG states are stored as tensors and lists for that reason). The run directory keeps the last
two: ``checkpoint.pt`` and ``checkpoint.prev.pt``. A file that does not load (a digest that does
not match after a write cut short or a damaged disk, objects other than tensors and plain values,
keys missing) is skipped with a warning and the older one is used; when none loads, the run stops
rather than start over and overwrite them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
import signal
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadfkd.base.errors import SignalReceived, UserError
from tadfkd.base.files import publish, reason, write_bytes, write_temporary

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
MAGIC = b"TADFKD\x01\n"
DIGEST_BYTES = 32  # sha256
# what SLURM sends ahead of preemption or the time limit, and Ctrl-C (handled alike)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


# -- random number generators -----------------------------------------------------------------
RNG_KEYS = ("python", "numpy", "torch", "cuda")  # the keys of ``rng_state()``


def rng_state() -> dict[str, Any]:
    """Every global RNG state (python, numpy, torch CPU and CUDA) as tensors and plain values."""
    version, internal, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned; CUDA states only when as many devices are present."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(
                f"the checkpoint holds {len(state['cuda'])} CUDA RNG states but "
                f"{torch.cuda.device_count()} devices are present; CUDA RNGs are not restored, "
                "so the resumed run will not repeat the uninterrupted one bit for bit",
                stacklevel=2,
            )


# -- files --------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``run_dir/checkpoint.pt`` atomically; the one before becomes
    ``checkpoint.prev.pt``. A failed write (e.g. disk full) leaves both untouched and is a
    ``UserError``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    data = MAGIC + hashlib.sha256(payload).digest() + payload
    latest = run_dir / LATEST
    try:
        temporary = write_temporary(latest, lambda path: write_bytes(path, data))
    except OSError as error:
        raise UserError(
            f"could not write checkpoint {latest} ({reason(error)}); the previous checkpoint is "
            "intact, so free some space and re-run the same command to resume."
        ) from None
    if latest.exists():
        os.replace(latest, run_dir / PREVIOUS)
    publish(temporary, latest)
    return latest


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state in one checkpoint file; ``ValueError`` when it is truncated or corrupted
    (checked before unpickling anything)."""
    data = path.read_bytes()
    header = len(MAGIC) + DIGEST_BYTES
    if len(data) < header or not data.startswith(MAGIC):
        raise ValueError("not a tadfkd checkpoint or cut short")
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : header]:
        raise ValueError("checksum mismatch: truncated or corrupted")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def missing_keys(state: Any, required: Mapping[str, Collection[str]]) -> list[str]:
    """The keys of ``required`` absent from ``state``, as ``key`` or ``key.inner``: each key
    maps to the keys its value (then a dict) must hold, or to nothing."""
    if not isinstance(state, dict):
        return list(required)
    missing = []
    for key, inner in required.items():
        if key not in state:
            missing.append(key)
        elif inner:
            value = state[key]
            held = value if isinstance(value, dict) else {}
            missing += [f"{key}.{name}" for name in inner if name not in held]
    return missing


def why_unusable(error: Exception) -> str:
    """What is wrong with a checkpoint file that raised ``error`` while loading, in a few words."""
    if isinstance(error, pickle.UnpicklingError):  # torch's message would advise unsafe loading
        return "it holds objects other than tensors and plain values, which are never loaded"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_checkpoint(
    run_dir: Path, required: Mapping[str, Collection[str]] | None = None
) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint in ``run_dir`` that loads and holds the ``required`` keys (see
    ``missing_keys``), with its path; None when there is no checkpoint file.

    A newest file that does not load is reported with a warning and the previous one is used;
    when checkpoint files exist but none loads, a ``UserError`` names them: the run's history is
    never discarded without being told to.
    """
    unusable = []
    for name in (LATEST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path)
            missing = missing_keys(state, required or {})
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            return state, path
        except Exception as error:  # any failure to load is damage: try the older file
            then = "; trying the previous one" if name == LATEST else ""
            warnings.warn(
                f"checkpoint {path} is unusable ({why_unusable(error)}){then}", stacklevel=2
            )
            unusable.append(path)
    if not unusable:
        return None
    files, verb, them = (
        (f"{unusable[0]} and {unusable[1]}", "are both", "them")
        if len(unusable) == 2
        else (str(unusable[0]), "is", "it")
    )
    raise UserError(
        f"checkpoint {files} {verb} unusable (see the warnings above), so the run cannot "
        f"resume; move {them} away to start the run over from epoch 0."
    )


# -- signals ------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals(react: Callable[[str], None]) -> Iterator[None]:
    """While inside, SIGTERM, SIGUSR1 and SIGINT call ``react(signal name)`` instead of killing the
    process: in the training loop, a request to finish the iteration and checkpoint; around it,
    ``raise_signal_received``. Outside the main thread, where Python cannot install handlers,
    signals keep their default effect."""

    def handler(number: int, _frame: Any) -> None:
        react(signal.Signals(number).name)

    previous: dict[int, Any] = {}
    try:
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def raise_signal_received(name: str) -> None:
    """The reaction to a stop signal outside the training loop, where nothing is in flight to
    finish or save: stop at once (``SignalReceived``, which the job turns into ``Interrupted``)."""
    raise SignalReceived(name)
