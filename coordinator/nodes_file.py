"""Nodes files: hypothetical machines described by chip and memory, to plan before buying.

```yaml
nodes:                      # or a bare list
  - name: studio
    chip: Apple M2 Ultra    # as macOS names it; "M2 Ultra" works too
    memory_gb: 192          # RAM as Apple sells it (GB = GiB)
    count: 2                # optional: studio-1, studio-2
  - {name: mini, chip: "Apple M4 Pro", memory_gb: 64, gpu_cores: 20, rdma: true}
```

Optional keys: count, id, gpu_cores, gpu_memory_gb (a raised iogpu.wired_limit_mb),
memory_in_use_gb, bandwidth_gbs (a published figure; a chip the table does not know needs
it or measured_bandwidth_gbs), measured_bandwidth_gbs and measured_tflops (what a worker
on that machine measured: ``pomona nodes --json``), rdma, address. JSON files take the
same shape. With a top level ``nodes:``, an optional
``rdma_cables: [[studio-1, studio-2], ...]`` says which machines a Thunderbolt 5 cable
with RDMA joins (without it, every ``rdma: true`` node is taken as cabled to the others):
`pomona plan` picks the backend from it. An optional ``links:`` gives measured (or
expected) links between pairs of nodes, which the planner uses instead of assuming 10 GbE
(``pomona nodes --json`` shows what a running cluster measured):

```yaml
links:
  - {between: [studio-1, studio-2], latency_ms: 0.05, gbit: 40, kind: thunderbolt}
  - {between: [studio-2, mini], latency_ms: 0.3, bandwidth_gbs: 1.1}   # GB/s
```
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pomona.chips import lookup_chip, suggest_chip
from pomona.coordinator.planner import Link, NodeSpec

GIB = 2**30
REQUIRED = ("name", "chip", "memory_gb")
OPTIONAL = (
    "count",
    "id",
    "gpu_cores",
    "gpu_memory_gb",
    "memory_in_use_gb",
    "bandwidth_gbs",
    "measured_bandwidth_gbs",
    "measured_tflops",
    "rdma",
    "address",
)
MAX_COUNT = 256
LINK_KEYS = ("between", "latency_ms", "bandwidth_gbs", "gbit", "kind")


class NodesFileError(ValueError):
    """A nodes file that cannot describe nodes; the message names the entry and the fix."""


def load_nodes_file(path: str | Path) -> list[NodeSpec]:
    """Read a YAML or JSON nodes file."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as e:
        raise NodesFileError(f"cannot read nodes file {file}: {e.strerror or e}") from e
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NodesFileError(f"{file} is not valid {_kind(file)}: {detail}") from e
    return parse_nodes(data, source=str(file))


def _kind(file: Path) -> str:
    return "JSON" if file.suffix.lower() == ".json" else "YAML"


def parse_nodes(data: Any, source: str = "nodes file") -> list[NodeSpec]:
    """NodeSpecs from parsed YAML/JSON: a list of entries or {"nodes": [...]}."""
    entries = data.get("nodes") if isinstance(data, Mapping) else data
    if not isinstance(entries, list) or not entries:
        raise NodesFileError(
            f"{source}: expected a list of nodes (or 'nodes:' holding one), e.g. "
            '- {name: studio, chip: "Apple M2 Ultra", memory_gb: 192}'
        )
    nodes: list[NodeSpec] = []
    for index, entry in enumerate(entries, start=1):
        nodes.extend(_entry(entry, f"{source}: node {index}"))
    seen: set[str] = set()
    for node in nodes:
        if node.node_id in seen:
            raise NodesFileError(f"{source}: two nodes are named {node.node_id!r}: rename one")
        seen.add(node.node_id)
    return nodes


def _entry(entry: Any, where: str) -> list[NodeSpec]:
    if not isinstance(entry, Mapping):
        raise NodesFileError(f"{where}: expected a mapping with {', '.join(REQUIRED)}")
    if isinstance(entry.get("name"), str) and entry["name"].strip():
        where = f"{where} ({entry['name']})"
    unknown = sorted(str(k) for k in entry if k not in REQUIRED + OPTIONAL)
    if unknown:
        raise NodesFileError(
            f"{where}: unknown key {', '.join(unknown)}; allowed: {', '.join(REQUIRED + OPTIONAL)}"
        )
    missing = [k for k in REQUIRED if entry.get(k) in (None, "")]
    if missing:
        raise NodesFileError(f"{where}: missing {', '.join(missing)}")
    name = _text(entry, "name", where)
    chip_name = _text(entry, "chip", where)
    memory = _number(entry, "memory_gb", where)
    bandwidth = _optional_number(entry, "bandwidth_gbs", where)
    measured = _optional_number(entry, "measured_bandwidth_gbs", where)
    if bandwidth is not None and measured is not None:
        raise NodesFileError(
            f"{where}: give the bandwidth once: bandwidth_gbs or measured_bandwidth_gbs"
        )
    tflops = _optional_number(entry, "measured_tflops", where)
    cores = _optional_integer(entry, "gpu_cores", where)
    chip = lookup_chip(chip_name)
    if chip is None and bandwidth is None and measured is None:
        hint = suggest_chip(chip_name)
        raise NodesFileError(
            f"{where}: unknown chip {chip_name!r}"
            + (f" (did you mean {hint!r}?)" if hint else "")
            + "; name a known Apple chip or give bandwidth_gbs (or measured_bandwidth_gbs)"
        )
    if chip is not None and cores is not None and cores not in chip.gpu_core_counts:
        counts = " or ".join(str(c) for c in chip.gpu_core_counts)
        raise NodesFileError(f"{where}: the {chip.name} has {counts} GPU cores, not {cores}")
    gpu_memory = _optional_number(entry, "gpu_memory_gb", where)
    if gpu_memory is not None and gpu_memory > memory:
        raise NodesFileError(f"{where}: gpu_memory_gb ({gpu_memory:g}) exceeds memory_gb")
    in_use = _optional_number(entry, "memory_in_use_gb", where, allow_zero=True) or 0.0
    rdma = entry.get("rdma", False)
    if not isinstance(rdma, bool):
        raise NodesFileError(f"{where}: rdma must be true or false, got {rdma!r}")
    address = entry.get("address")
    if address is not None and not isinstance(address, str):
        raise NodesFileError(f"{where}: address must be a string like 10.0.0.2:7700")
    count = _optional_integer(entry, "count", where) or 1
    if count > MAX_COUNT:
        raise NodesFileError(f"{where}: count {count} is over {MAX_COUNT}; describe fewer nodes")
    if count > 1 and (address is not None or "id" in entry):
        raise NodesFileError(f"{where}: address and id name one machine; drop count or them")
    names = [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]
    ids = [_text(entry, "id", where)] if "id" in entry else names
    return [
        NodeSpec(
            node_id=node_id,
            name=node_name,
            chip=f"Apple {chip.name}" if chip else chip_name,
            total_memory_bytes=round(memory * GIB),
            gpu_memory_limit_bytes=round(gpu_memory * GIB) if gpu_memory else None,
            memory_in_use_bytes=round(in_use * GIB),
            bandwidth_gbs=bandwidth if measured is None else measured,
            gpu_cores=cores,
            bandwidth_measured=measured is not None,
            measured_tflops=tflops,
            rdma=rdma,
            address=address,
        )
        for node_id, node_name in zip(ids, names, strict=True)
    ]


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise NodesFileError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _number(entry: Mapping[str, Any], key: str, where: str) -> float:
    value = _optional_number(entry, key, where)
    if value is None:
        raise NodesFileError(f"{where}: missing {key}")
    return value


def _optional_number(
    entry: Mapping[str, Any], key: str, where: str, allow_zero: bool = False
) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value >= 0 if allow_zero else value > 0):
        kind = "a number, 0 or more" if allow_zero else "a positive number"
        raise NodesFileError(f"{where}: {key} must be {kind}, got {value!r}")
    return float(value)


def _optional_integer(entry: Mapping[str, Any], key: str, where: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise NodesFileError(f"{where}: {key} must be a whole number of 1 or more, got {value!r}")
    return value


def load_rdma_cables(path: str | Path) -> list[tuple[str, str]] | None:
    """The top-level ``rdma_cables: [[a, b], ...]`` of a nodes file: pairs of node names
    joined by a Thunderbolt 5 cable with RDMA working. None when the file has none (then
    nodes with ``rdma: true`` are taken as cabled to each other)."""
    file = Path(path)
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError):
        return None  # load_nodes_file has said what is wrong
    cables = data.get("rdma_cables") if isinstance(data, Mapping) else None
    if cables is None:
        return None
    if not isinstance(cables, list) or not all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in cables
    ):
        raise NodesFileError(f"{file}: rdma_cables must be pairs of node names, e.g. [[a, b]]")
    return [(a, b) for a, b in cables]


def load_links(path: str | Path, nodes: list[NodeSpec]) -> list[Link]:
    """The top-level ``links:`` of a nodes file, between ``nodes`` (named as in the file,
    ``count`` names included): one Link per pair, none when the file has no links."""
    file = Path(path)
    try:
        text = file.read_text()
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError):
        return []  # load_nodes_file has said what is wrong
    entries = data.get("links") if isinstance(data, Mapping) else None
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise NodesFileError(
            f"{file}: links must be a list, e.g. - {{between: [a, b], latency_ms: 0.3, gbit: 10}}"
        )
    ids = {n.name: n.node_id for n in nodes}
    links: list[Link] = []
    seen: set[frozenset[str]] = set()
    for index, entry in enumerate(entries, start=1):
        link = _link(entry, f"{file}: link {index}", ids)
        pair = frozenset((link.a, link.b))
        if pair in seen:
            raise NodesFileError(f"{file}: link {index} joins a pair already given: keep one")
        seen.add(pair)
        links.append(link)
    return links


def _link(entry: Any, where: str, ids: Mapping[str, str]) -> Link:
    if not isinstance(entry, Mapping):
        raise NodesFileError(f"{where}: expected a mapping with between, latency_ms, gbit")
    unknown = sorted(str(k) for k in entry if k not in LINK_KEYS)
    if unknown:
        raise NodesFileError(
            f"{where}: unknown key {', '.join(unknown)}; allowed: {', '.join(LINK_KEYS)}"
        )
    pair = entry.get("between")
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        raise NodesFileError(f"{where}: between must name two nodes, e.g. [studio-1, studio-2]")
    for name in pair:
        if name not in ids:
            raise NodesFileError(
                f"{where}: no node is named {name!r}; the nodes are {', '.join(sorted(ids))}"
            )
    if pair[0] == pair[1]:
        raise NodesFileError(f"{where}: a link joins two different nodes, not {pair[0]!r} twice")
    latency = _optional_number(entry, "latency_ms", where, allow_zero=True)
    if latency is None:
        raise NodesFileError(f"{where}: missing latency_ms (one way, milliseconds)")
    gbs = _optional_number(entry, "bandwidth_gbs", where)
    gbit = _optional_number(entry, "gbit", where)
    if (gbs is None) == (gbit is None):
        raise NodesFileError(f"{where}: give the bandwidth once: gbit (Gbit/s) or bandwidth_gbs")
    kind = entry.get("kind", "ethernet")
    if not isinstance(kind, str) or not kind.strip():
        raise NodesFileError(f"{where}: kind must be a word such as thunderbolt or ethernet")
    return Link(
        ids[pair[0]],
        ids[pair[1]],
        latency_ms=latency,
        bandwidth_gbs=gbs if gbs is not None else (gbit or 0.0) / 8,
        kind=kind.strip(),
    )
