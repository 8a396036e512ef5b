"""A sweep's wall time over all its launches: a sweep may run in several sittings (the same
command relaunched finishes only what is missing), so each launch appends its start to
``launches.json`` in the sweep directory and its end when it ends; a launch that was stopped
(a killed session, a reboot) ends, for the sum, at the last file its jobs wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tadfkd.base.files import write_json

LAUNCHES_FILE = "launches.json"


def read_launches(sweep_dir: Path) -> list[dict[str, Any]]:
    """The launches recorded in ``sweep_dir`` (oldest first); [] when none or unreadable."""
    try:
        launches = json.loads((sweep_dir / LAUNCHES_FILE).read_text()).get("launches", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [
        launch
        for launch in launches
        if isinstance(launch, dict) and isinstance(launch.get("started"), int | float)
    ]


def record_launch(sweep_dir: Path, event: str, cpu: str | None = None) -> None:
    """Append a launch's start (``event="started"``, with the CPU it runs on) or set the last
    launch's end (``"ended"``) in ``sweep_dir/launches.json``."""
    launches = read_launches(sweep_dir)
    now = time.time()
    if event == "started":
        launches.append({"started": now, "ended": None, "cpu": cpu})
    elif launches:
        launches[-1]["ended"] = now
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / LAUNCHES_FILE, {"launches": launches})


def last_write(sweep_dir: Path, start: float, stop: float) -> float:
    """The latest modification time in [start, stop) of a file under ``sweep_dir`` (the launches
    file left out); ``start`` when there is none."""
    latest = start
    for path in sweep_dir.rglob("*"):
        if path.name == LAUNCHES_FILE or not path.is_file():
            continue
        modified = path.stat().st_mtime
        if start <= modified < stop:
            latest = max(latest, modified)
    return latest


def sweep_wall_time(sweep_dir: Path) -> tuple[float, int, int, list[str]] | None:
    """(seconds, launches, of them stopped, the CPUs named) summed over the launches of
    ``sweep_dir``, each from its start to its end, or to the last file written before the next
    launch when it was stopped; None when the sweep recorded no launch."""
    launches = read_launches(sweep_dir)
    if not launches:
        return None
    total, stopped = 0.0, 0
    for number, launch in enumerate(launches):
        following = launches[number + 1]["started"] if number + 1 < len(launches) else time.time()
        ended = launch.get("ended")
        if not isinstance(ended, int | float):
            stopped += 1
            ended = last_write(sweep_dir, launch["started"], following)
        total += max(0.0, ended - launch["started"])
    cpus = sorted({str(launch["cpu"]) for launch in launches if launch.get("cpu")})
    return total, len(launches), stopped, cpus
