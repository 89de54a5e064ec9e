"""Does a model fit on some nodes? Memory budgets, contiguous layer splits that respect
them, and, when nothing fits, what would.

Pure logic used by the planner; node specs come in duck-typed (planner.NodeSpec).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pomona.chips import lookup_chip
from pomona.model_profile import ModelProfile
from pomona.units import format_bytes

if TYPE_CHECKING:
    from pomona.coordinator.planner import NodeSpec

GIB = 2**30
GPU_MEMORY_FRACTION = 0.75  # macOS lets the GPU wire ~75% of RAM unless iogpu.wired_limit_mb
DEFAULT_OS_RESERVE_BYTES = 4 * GIB
DEFAULT_BANDWIDTH_GBS = 68.0  # the slowest Apple Silicon (M1): used only when unknown
DEFAULT_GPU_CORES = 7  # the smallest Apple Silicon GPU (M1, 7 cores)
FLOPS_PER_GPU_CORE = 0.35e12  # 128 ALUs x 2 (FMA) x ~1.4 GHz
PREFILL_CHUNK_TOKENS = 2048  # mlx-lm's prefill step: the most tokens in flight at once


def split_layers(num_layers: int, weights: Sequence[float]) -> list[int]:
    """Layers per stage proportional to `weights` (largest remainder), each at least 1."""
    if not weights:
        raise ValueError("split_layers needs at least one weight, one per stage")
    if num_layers < len(weights):
        raise ValueError(f"{num_layers} layers cannot fill {len(weights)} stages: use fewer")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"weights must be finite and positive, got {list(weights)}")
    total = sum(weights)
    quotas = [num_layers * w / total for w in weights]
    counts = [max(1, math.floor(q)) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in itertools.islice(itertools.cycle(by_remainder), max(num_layers - sum(counts), 0)):
        counts[i] += 1
    while sum(counts) > num_layers:  # the 1-layer minimum overshot: take from the fullest
        i = min(
            (i for i in range(len(counts)) if counts[i] > 1),
            key=lambda i: (quotas[i] - counts[i], -i),
        )
        counts[i] -= 1
    return counts


@dataclass(frozen=True)
class NodeBudget:
    """A node with its unknowns resolved: usable memory, bandwidth, compute."""

    spec: NodeSpec
    budget: int  # bytes the GPU may use for Pomona on this node
    bandwidth_gbs: float
    bandwidth_assumed: bool
    flops: float
    gpu_cores: int
    # What was not given and how it was filled in, for the plan's notes; empty: nothing.
    cores_assumption: str = ""
    memory_limit_assumed: bool = False
    # Figures a worker measured rather than a datasheet's (planner.decode_bytes_per_s).
    bandwidth_measured: bool = False
    flops_measured: bool = False

    @property
    def key(self) -> tuple[float, int, str]:
        """Ranking: fastest memory first, then most memory, then id (determinism)."""
        return (-self.bandwidth_gbs, -self.budget, self.spec.node_id)


def resolve_node(spec: NodeSpec, os_reserve_bytes: int = DEFAULT_OS_RESERVE_BYTES) -> NodeBudget:
    """budget = min(GPU wired limit, RAM - OS reserve - memory other processes use)."""
    total = spec.total_memory_bytes
    limit = spec.gpu_memory_limit_bytes or int(total * GPU_MEMORY_FRACTION)
    budget = min(limit, total - os_reserve_bytes - spec.memory_in_use_bytes)
    chip = lookup_chip(spec.chip)
    bandwidth = spec.bandwidth_gbs or (chip.bandwidth_gbs(spec.gpu_cores) if chip else None)
    if spec.measured_tflops is not None:  # no GPU cores to count, nor to assume
        cores, assumption, flops = spec.gpu_cores or 0, "", spec.measured_tflops * 1e12
    else:
        cores, assumption = _gpu_cores(spec)
        flops = cores * FLOPS_PER_GPU_CORE
    return NodeBudget(
        spec=spec,
        budget=budget,
        bandwidth_gbs=bandwidth or DEFAULT_BANDWIDTH_GBS,
        bandwidth_assumed=bandwidth is None,
        flops=flops,
        gpu_cores=cores,
        cores_assumption=assumption,
        memory_limit_assumed=spec.gpu_memory_limit_bytes is None,
        bandwidth_measured=spec.bandwidth_measured,
        flops_measured=spec.measured_tflops is not None,
    )


def _gpu_cores(spec: NodeSpec) -> tuple[int, str]:
    """The node's GPU core count, and, where it was not given, what was assumed."""
    if spec.gpu_cores:
        return spec.gpu_cores, ""
    chip = lookup_chip(spec.chip)
    variant = chip.variant() if chip else None
    if chip is None or variant is None:
        return DEFAULT_GPU_CORES, (
            f"GPU cores of {spec.chip or 'an unknown chip'} not known: assumed "
            f"{DEFAULT_GPU_CORES} (the smallest Apple GPU); give gpu_cores"
        )
    if len(chip.variants) == 1:
        return variant.gpu_cores, ""
    return variant.gpu_cores, (
        f"GPU cores not given: assumed the {variant.gpu_cores}-core {chip.name} "
        f"({variant.bandwidth_gbs:g} GB/s), the smaller variant; give gpu_cores "
        f"({' or '.join(str(c) for c in chip.gpu_core_counts)})"
    )


def _prefix(values: Sequence[Any]) -> list[Any]:
    return [0, *itertools.accumulate(values)]


class Demand:
    """What the model asks of stages at a context length and concurrency, as prefix
    sums over layers (index j holds the total of layers 0..j-1)."""

    def __init__(
        self,
        profile: ModelProfile,
        context: int,
        concurrency: int,
        head_everywhere: bool,
        draft_bytes: int = 0,
    ) -> None:
        p = profile
        self.profile, self.context, self.concurrency = p, context, concurrency
        self.head_everywhere = head_everywhere
        # Speculative decoding: the draft model (weights and KV) lives beside stage 0.
        self.draft_bytes = draft_bytes
        n = p.num_layers
        self.weights = _prefix([layer.weight_bytes for layer in p.layers])
        self.kv = _prefix([p.layer_kv_bytes(j, context, concurrency) for j in range(n)])
        self.cost = [w + k for w, k in zip(self.weights, self.kv, strict=True)]
        self.decode_read = _prefix([p.layer_active_bytes(j, concurrency) for j in range(n)])
        self.activation = min(context, PREFILL_CHUNK_TOKENS) * p.activation_bytes_per_token
        self.logits = concurrency * p.vocab_size * 4 * 2  # float32 logits and their softmax

    def with_(self, **changes: Any) -> Demand:
        args = dict(
            profile=self.profile,
            context=self.context,
            concurrency=self.concurrency,
            head_everywhere=self.head_everywhere,
            draft_bytes=self.draft_bytes,
        )
        return Demand(**{**args, **changes})

    def holds(self, i: int, k: int) -> tuple[bool, bool]:
        """Whether stage i of k holds (the embedding, the norm and lm_head)."""
        return (i == 0 or self.head_everywhere, i == k - 1 or self.head_everywhere)

    def fixed_weights(self, i: int, k: int) -> int:
        p, (embedding, head) = self.profile, self.holds(i, k)
        tied = p.tied_embeddings and head  # the head is the embedding matrix
        return p.embedding_bytes * (embedding or tied) + p.head_bytes * head

    def fixed(self, i: int, k: int) -> int:
        """Bytes stage i of k needs whatever its layers: embedding/head, activations."""
        head = self.holds(i, k)[1]
        draft = self.draft_bytes if i == 0 else 0
        return self.fixed_weights(i, k) + self.activation + self.logits * head + draft

    def total(self, k: int) -> int:
        return self.cost[-1] + sum(self.fixed(i, k) for i in range(k))


def fit_stages(order: Sequence[NodeBudget], d: Demand) -> list[int] | None:
    """End layer of each stage, in `order`, as close to bandwidth-proportional as every
    node's budget allows; None when no contiguous split fits."""
    k, n = len(order), d.profile.num_layers
    if k > n:
        return None
    caps = [node.budget - d.fixed(i, k) for i, node in enumerate(order)]

    def last_end(i: int, p: int) -> int:  # the furthest stage i may reach from layer p
        return min(bisect_right(d.cost, d.cost[p] + caps[i]) - 1, n - (k - 1 - i))

    # feasible[i][p]: stages i.. can hold layers p.. (each stage non-empty, in budget)
    feasible = [[False] * (n + 1) for _ in range(k + 1)]
    feasible[k][n] = True
    for i in range(k - 1, -1, -1):
        seen = _prefix([int(x) for x in feasible[i + 1]])
        for p in range(n):
            hi = last_end(i, p)
            feasible[i][p] = hi > p and seen[hi + 1] - seen[p + 1] > 0
    if not feasible[0][0]:
        return None
    targets = list(itertools.accumulate(_target_counts(order, caps, d)))
    ends, p = [], 0
    for i in range(k):
        choices = [e for e in range(p + 1, last_end(i, p) + 1) if feasible[i + 1][e]]
        p = _closest(choices, targets[i])
        ends.append(p)
    return ends


def _closest(choices: Sequence[int], target: int) -> int:
    """The choice nearest `target`; on a tie the larger (earlier stages rank faster)."""
    return min(choices, key=lambda e: (abs(e - target), -e))


def _target_counts(order: Sequence[NodeBudget], caps: Sequence[int], d: Demand) -> list[int]:
    """Layers proportional to bandwidth, water-filled under each node's capacity."""
    n = d.profile.num_layers
    per_layer = max(d.cost[n] / n, 1.0)
    room = [max(c, 0) / per_layer for c in caps]
    shares = [0.0] * len(order)
    free, left = list(range(len(order))), float(n)
    while free:
        weight = sum(order[i].bandwidth_gbs for i in free)
        over = [i for i in free if left * order[i].bandwidth_gbs / weight > room[i]]
        if not over:
            for i in free:
                shares[i] = left * order[i].bandwidth_gbs / weight
            break
        for i in over:
            shares[i], left = room[i], left - room[i]
        free = [i for i in free if i not in over]
    return split_layers(n, [max(s, 1e-9) for s in shares])


def _fits(nodes: Sequence[NodeBudget], d: Demand) -> bool:
    """Whether some leading run of the ranked nodes holds the model (greedy, for advice)."""
    ranked = sorted(nodes, key=lambda n: n.key)[: d.profile.num_layers]
    return any(fit_stages(ranked[:k], d) is not None for k in range(len(ranked), 0, -1))


def _gib(n: float) -> str:
    return format_bytes(n)


def _largest_that_fits(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest x in [lo, hi] with fits(x), for fits true up to some x, false after."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _node_suggestion(nodes: Sequence[NodeBudget], d: Demand, reserve: int) -> str | None:
    """The least memory one node would need to gain for the model to fit."""
    step = GIB // 16
    most = math.ceil((d.total(len(nodes)) + GIB) / step)
    best: tuple[int, NodeBudget] | None = None
    tried = set()
    for node in sorted(nodes, key=lambda n: n.key):
        if (kind := (node.budget, node.bandwidth_gbs)) in tried:
            continue  # an identical node needs the same
        tried.add(kind)
        others = [n for n in nodes if n is not node]

        def short_with(steps: int, node: NodeBudget = node, others: Any = others) -> bool:
            return not _fits([*others, replace(node, budget=node.budget + steps * step)], d)

        if short_with(most):
            continue
        still_short = _largest_that_fits(0, most, short_with)
        extra = 0 if still_short is None else (still_short + 1) * step
        if best is None or extra < best[0]:
            best = (extra, node)
    if best is None:
        return None
    extra, node = best
    spec, target = node.spec, node.budget + extra
    if target <= spec.total_memory_bytes - reserve - spec.memory_in_use_bytes:
        return (
            f"the GPU of {spec.name} allowed {_gib(extra)} more "
            f"(sudo sysctl iogpu.wired_limit_mb={math.ceil(target / 2**20)})"
        )
    ram = max(target / GPU_MEMORY_FRACTION, target + reserve + spec.memory_in_use_bytes)
    return (
        f"{_gib(extra)} more usable memory on {spec.name} "
        f"(at least {math.ceil(ram / GIB)} GB of RAM)"
    )


def _variant_advice(nodes: Sequence[NodeBudget], d: Demand) -> tuple[str | None, str]:
    """(a lower-bit variant that fits, or None; a note when even 4-bit does not)."""
    profile = d.profile
    bits_now = profile.quantization.bits if profile.quantization else 8 * profile.dtype_bytes
    variant = None
    for bits in (b for b in (8, 4) if b < bits_now):
        variant = profile.estimate_quantized(bits)
        if _fits(nodes, d.with_(profile=variant)):
            article = "an" if bits == 8 else "a"
            return f"{article} {bits}-bit variant (~{_gib(variant.weight_bytes)} of weights)", ""
    if variant is None:
        return None, ""
    return (
        None,
        f" A 4-bit variant (~{_gib(variant.weight_bytes)} of weights) would not fit either.",
    )


def explain_refusal(
    profile: ModelProfile, nodes: Sequence[NodeBudget], d: Demand, reserve: int
) -> tuple[str, int, tuple[str, ...]]:
    """(message, shortfall in bytes, suggestions) for a model that fits no node subset."""
    k = min(len(nodes), profile.num_layers)
    need, have = d.total(k), sum(max(n.budget, 0) for n in nodes)
    short = need - have
    variant, note = _variant_advice(nodes, d)
    suggestions = [variant] if variant else []
    if d.context > 256:
        context = _largest_that_fits(256, d.context - 1, lambda c: _fits(nodes, d.with_(context=c)))
        if context is not None:
            suggestions.append(f"a context of {context // 256 * 256} tokens or fewer")
    if d.concurrency > 1:
        streams = _largest_that_fits(
            1, d.concurrency - 1, lambda c: _fits(nodes, d.with_(concurrency=c))
        )
        if streams is not None:
            suggestions.append(f"{streams} concurrent streams or fewer")
    if (node := _node_suggestion(nodes, d, reserve)) is not None:
        suggestions.append(node)
    if short > 0:
        suggestions.append(f"more nodes with {_gib(short)} more usable memory in all")
    weights = d.weights[-1] + sum(d.fixed_weights(i, k) for i in range(k))
    kv = d.kv[-1]
    plural = "stream" if d.concurrency == 1 else "streams"
    head = (
        f"{profile.name} ({profile.precision}) does not fit on {len(nodes)} node"
        f"{'' if len(nodes) == 1 else 's'} for {d.concurrency} {plural} of {d.context} tokens: "
        f"it needs {_gib(need)} (weights {_gib(weights)}, KV cache {_gib(kv)}, activations "
        f"{_gib(need - weights - kv)}) and the nodes let the GPU use {_gib(have)}"
    )
    if short > 0:
        head += f", {_gib(short)} short"
    else:
        largest = max(layer.weight_bytes for layer in profile.layers)
        head += f", but no split into contiguous layers fits every node (a layer: {_gib(largest)})"
    tail = "; or ".join(suggestions) if suggestions else "more nodes"
    return f"{head}. It would fit with {tail}.{note}", max(short, 0), tuple(suggestions)
