"""Full-state checkpoints of a run: written atomically, verified before anything is unpickled.

A checkpoint file is ``MAGIC + sha256(payload) + payload``, where ``payload`` is ``torch.save``
of a dict of tensors and plain Python values, so that ``torch.load(weights_only=True)`` reads it
(RNG states are stored as tensors and lists for that reason). The run directory keeps the last
two: ``checkpoint.pt`` and ``checkpoint.prev.pt``. A file whose digest does not match (a write
cut short, a damaged disk) is skipped with a warning and the older one is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tadfkd.errors import UserError
from tadfkd.files import publish, write_durably, write_temporary

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
MAGIC = b"TADFKD\x01\n"
DIGEST_BYTES = 32  # sha256
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # what SLURM sends ahead of preemption or the time limit


# -- random number generators -----------------------------------------------------------------
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
        temporary = write_temporary(latest, lambda path: write_durably(path, data))
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UserError(
            f"could not write checkpoint {latest} ({reason}); the previous checkpoint is "
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


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest intact checkpoint in ``run_dir`` and its path, or None when there is none.

    A damaged newest file is reported with a warning and the previous one is used.
    """
    for name in (LATEST, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return read_checkpoint(path), path
        except (ValueError, RuntimeError, OSError, EOFError) as error:
            warnings.warn(
                f"checkpoint {path} is unusable ({error}); trying an older one", stacklevel=2
            )
    return None


# -- signals ------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """While inside, SIGTERM and SIGUSR1 call ``request_stop(signal name)`` instead of killing
    the process (the loop then finishes its iteration and checkpoints). Outside the main thread,
    where Python cannot install handlers, signals keep their default effect."""

    def handler(number: int, _frame: Any) -> None:
        name = signal.Signals(number).name
        print(f"{name} received: finishing the current iteration, then checkpointing", flush=True)
        request_stop(name)

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
