"""The files a worker keeps per load: the runner's log and the MLX ring's host file.

Each load writes `runner-<load_id>.log` and `hosts-<load_id>.json` (for JACCL,
`ibv-devices-<load_id>.json`) under the worker's
`state_dir/runs`; every re-plan is a new load, so without pruning they pile up for as
long as the machine serves. Only the last few loads are kept: enough to read why a
runner failed after the cluster has re-formed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["RUNS_KEPT", "prune_runs", "runs_dir"]

RUNS_KEPT = 5
_RUN_FILE = re.compile(r"(?:runner-(?P<log>.+)\.log|(?:hosts|ibv-devices)-(?P<hosts>.+)\.json)")


def runs_dir(state_dir: Path) -> Path:
    return state_dir / "runs"


def prune_runs(directory: Path, keep: int = RUNS_KEPT, current: str = "") -> list[Path]:
    """Deletes the files of all loads but the ``keep`` written most recently and
    ``current`` (a load id); other files are left alone. Returns what it deleted."""
    loads: dict[str, list[Path]] = {}
    latest: dict[str, float] = {}
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        match = _RUN_FILE.fullmatch(path.name)
        if match is None:
            continue
        load_id = match["log"] or match["hosts"]
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        loads.setdefault(load_id, []).append(path)
        latest[load_id] = max(latest.get(load_id, mtime), mtime)
    newest = sorted(loads, key=lambda load_id: latest[load_id], reverse=True)
    deleted = []
    for load_id in newest[keep:]:
        if load_id == current:
            continue
        for path in loads[load_id]:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("cannot delete %s: %s", path, e.strerror)
                continue
            deleted.append(path)
    return deleted
