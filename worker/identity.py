"""A node id that survives restarts but not being copied to another machine.

The id is stored in the worker's state directory together with a fingerprint
of the machine it was made on. A state directory copied to another Mac (a
cloned disk, a copied config) finds a different fingerprint there and gets a
fresh id, so two machines never share one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def machine_fingerprint() -> str:
    """A stable identifier of this machine (not secret, only compared)."""
    raw = None
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            for line in out.splitlines():
                if "IOPlatformUUID" in line:
                    raw = line.split("=")[-1].strip().strip('"')
        except (OSError, subprocess.SubprocessError):
            raw = None
    else:
        for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
            try:
                raw = Path(path).read_text().strip() or None
            except OSError:
                continue
            if raw:
                break
    if not raw:
        raw = f"mac:{uuid.getnode():012x}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_node_id(state_dir: Path, fingerprint: str | None = None) -> str:
    """This worker's node id, created on first use."""
    fingerprint = fingerprint or machine_fingerprint()
    path = state_dir / "node.json"
    try:
        data = json.loads(path.read_text())
        if data.get("fingerprint") == fingerprint and data.get("node_id"):
            return str(data["node_id"])
        log.warning("%s was made on another machine; this worker gets a new node id", path)
    except (OSError, ValueError):
        pass
    node_id = uuid.uuid4().hex[:12]
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"node_id": node_id, "fingerprint": fingerprint}))
    tmp.replace(path)
    return node_id
