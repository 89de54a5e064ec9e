"""Configuration objects, built once at the CLI edge and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pomona.security import Auth

SERVICE_TYPE = "_pomona._tcp.local."
PROTOCOL_VERSION = 1
DEFAULT_CLUSTER = "default"
DEFAULT_COORDINATOR_PORT = 50150
DEFAULT_HTTP_PORT = 8080
DEFAULT_WORKER_PORT = 50151
DEFAULT_MODEL = "pomona-demo"
# A chat template travels to each runner inside its spec, one command-line argument,
# which Linux caps at 128 KiB; real templates are a few KiB.
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024
# Speculative decoding: the most tokens a draft model proposes in one step.
MAX_DRAFT_TOKENS = 32
# Tokens of context (prompt + output) the coordinator reserves KV cache for, and the
# context `pomona plan` plans for unless told otherwise.
DEFAULT_CONTEXT = 8192


def default_state_dir() -> Path:
    """Per-user state: node ids, caches of the demo model, logs."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pomona"


def default_model_dirs() -> tuple[Path, ...]:
    return (Path.home() / "models", default_cache_dir())


def default_cache_dir() -> Path:
    """Where a worker keeps the stage folders it receives from other workers."""
    return Path.home() / ".cache" / "pomona" / "models"


@dataclass(frozen=True)
class WorkerConfig:
    name: str
    cluster: str = DEFAULT_CLUSTER
    # Proof of the cluster secret (None: no checks, --insecure), and the
    # configuration file it came from, which runners read themselves.
    auth: Auth | None = None
    cluster_config: Path | None = None
    # Models may run code they ship only when the operator allows it.
    allow_remote_code: bool = False
    host: str = "0.0.0.0"
    port: int = DEFAULT_WORKER_PORT
    # The port of this machine's MLX ring listener; 0 means port + 1.
    ring_port: int = 0
    # The port a head runner of this machine serves requests on; 0 means port + 2.
    runner_port: int = 0
    # Addresses to advertise and to give the ring; empty means every
    # non-loopback IPv4 address of this machine.
    addresses: tuple[str, ...] = ()
    # Interfaces (by address) for Bonjour; empty means all.
    mdns_interfaces: tuple[str, ...] = ()
    state_dir: Path = field(default_factory=default_state_dir)
    model_dirs: tuple[Path, ...] = field(default_factory=default_model_dirs)
    # Seconds a runner may take to load and join its group.
    load_timeout: float = 600.0
    # Cap on the memory this worker offers to models (0: no cap).
    max_memory_bytes: int = 0
    # Stage folders received from other workers, and the cache's limit (0: none).
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_max_bytes: int = 0
    # Keep a spare runner, its imports done, for the next load
    # (worker/warm_runner.py).
    spare_runner: bool = True

    @property
    def effective_ring_port(self) -> int:
        return self.ring_port or self.port + 1

    @property
    def effective_runner_port(self) -> int:
        return self.runner_port or self.port + 2


@dataclass(frozen=True)
class CoordinatorConfig:
    cluster: str = DEFAULT_CLUSTER
    auth: Auth | None = None
    host: str = "0.0.0.0"
    port: int = DEFAULT_COORDINATOR_PORT
    # The OpenAI-compatible HTTP API (and /metrics); 0 turns it off. Without an
    # API key it listens on loopback only (see ``http_host_for``).
    http_port: int = DEFAULT_HTTP_PORT
    http_host: str = "127.0.0.1"
    # Bearer key the HTTP API requires; empty means none.
    api_key: str = ""
    model: str = DEFAULT_MODEL
    # Static "host:port" workers, for networks where multicast is blocked.
    seeds: tuple[str, ...] = ()
    # Wait for this many workers before the first plan.
    min_workers: int = 1
    # Quiet time after the last membership change before planning: Bonjour
    # answers to one query arrive within ~120 ms of each other (RFC 6762's
    # random delay), and each is then described in a round trip. Not before the
    # first plan once ``min_workers`` (> 1) are in: that many were expected.
    settle_seconds: float = 0.5
    # Before the first plan, while workers found so far hold some ranks of a
    # running load of this model: how long to wait for the other ranks, to
    # adopt the load rather than reload the model (a restarted coordinator).
    adopt_wait_seconds: float = 10.0
    mdns_interfaces: tuple[str, ...] = ()
    load_timeout: float = 600.0
    # Layers per worker, in order; empty means split by memory.
    layers: tuple[int, ...] = ()
    # Requests decoded together, waiting at most, and prompt tokens per
    # prefill chunk (smaller chunks stall running streams less).
    max_batch: int = 16
    max_queue: int = 64
    prefill_step: int = 0  # 0: the head runner chooses (worker/runner.py)
    # Speculative decoding: a draft model the head runner runs (empty: none),
    # and the most tokens it drafts per step.
    draft_model: str = ""
    num_draft_tokens: int = 4
    # Prefix KV cache per worker, GB (0: off); None: the planner's default.
    prompt_cache_gb: float | None = None
    # A Jinja chat template replacing the model's own (the text, read at the CLI);
    # empty: the model's, or a plain role format for a model without one.
    chat_template: str = ""
    # The planner: "latency" uses the fewest, fastest nodes that fit;
    # "throughput" uses every node that fits. KV cache is reserved for
    # ``concurrency`` sequences of ``context`` tokens.
    objective: str = "latency"
    # The MLX backend of the group: "auto" (pomona.coordinator.backend_choice), or one
    # of pomona.backends.BACKENDS; any that cannot form falls back to "ring".
    backend: str = "auto"
    # How the model is split: "pipeline" (layer ranges), "tensor" (a slice of every
    # layer on every node), or "auto": tensor where the planner predicts it faster.
    parallel: str = "auto"
    context: int = DEFAULT_CONTEXT
    concurrency: int = 4
    # A node whose heartbeats stop for this long (and that then fails a
    # direct probe) is lost.
    heartbeat_timeout: float = 5.0
    # A request that had no token yet when the pipeline broke waits this long
    # for the pipeline to re-form, then is retried; otherwise it fails.
    retry_timeout: float = 120.0
    # The event logs (events/<cluster>.jsonl) live here.
    state_dir: Path = field(default_factory=lambda: default_state_dir() / "coordinator")
    # Model folders (and the Hugging Face cache) the coordinator serves to
    # workers that lack the model; empty: it serves none.
    model_dirs: tuple[Path, ...] = ()


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def http_host_for(host: str, api_key: str, insecure_http: bool) -> str:
    """Where the HTTP API listens: ``host`` with a key (or when told), else loopback only."""
    if api_key or insecure_http or host in LOOPBACK_HOSTS or host.startswith("127."):
        return host
    return "127.0.0.1"
