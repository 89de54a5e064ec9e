"""Outputs recorded on real Macs (tests/data/macos/RECORDINGS.md names each source).

A few were published in a shape the command never prints (pretty-printed with the
poster's `//` notes, a Python dict, a shell log with `$` prompts and `#` notes); the
helpers here turn them back into what the command prints, and say so.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

MACOS = Path(__file__).parent / "data" / "macos"


def recorded(name: str) -> str:
    return (MACOS / name).read_text()


def recorded_bytes(name: str) -> bytes:
    return (MACOS / name).read_bytes()


def recordings(prefix: str) -> list[str]:
    """The recorded files whose names start with `prefix` (sorted)."""
    return sorted(p.name for p in MACOS.glob(f"{prefix}*"))


def macmon_lines(name: str) -> list[str]:
    """The lines `macmon pipe` printed: one compact JSON object each."""
    text = recorded(name)
    if name.endswith(".jsonl"):
        return [line for line in text.splitlines() if line.strip()]
    if name.endswith(".jsonc"):  # pretty-printed, with the poster's `// unit` notes
        doc = json.loads(re.sub(r"//[^\n]*", "", text))
    elif name.endswith("_pydict.py"):  # stored as `NAME = {...}` in a Python test
        doc = ast.literal_eval(text.split("=", 1)[1].strip())
    else:
        raise ValueError(f"{name}: not a macmon recording")
    return [json.dumps(doc, separators=(",", ":"))]


def sysctl_lines(name: str) -> str:
    """`sysctl` output; a shell log's `$ command` lines, indentation and notes removed."""
    lines = []
    for line in recorded(name).splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("$"):
            lines.append(line)
    return "\n".join(lines) + "\n"
