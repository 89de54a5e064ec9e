"""One stream's decode tokens/s with a draft model (speculative decoding) and without.

In one run of this script, the systems taking turns request by request:

1. single-process mlx-lm without a draft (``stream_generate``), pinned to core 0;
2. Pomona, 2 workers pinned to cores 0 and 1, no draft;
3. the same Pomona cluster shape with ``--draft-model``.

The target/draft pair is made by *self-speculation*: the target's layers from
``--draft-layers`` on have their output projections (``o_proj``, ``down_proj``)
scaled down, so they write weakly into the residual stream; the draft is the
target's first ``--draft-layers`` layers with its embedding, final norm and
head. The scale is calibrated before the run (greedy agreement of draft and
target over the target's own continuation of the prompt, float32) to the
acceptance asked (``--acceptance``, 0.75 by default); the acceptance the
Pomona run reports is printed with the results.

Decoding is greedy; the three systems must give the same tokens (checked).
Defaults: a 16-layer llama, hidden 512, bfloat16 (on this CPU, bfloat16
matmuls cost about the same for 1 and 5 tokens, as memory-bound Macs do).
``--config PATH`` takes a real model's shape (hidden size, layers, heads) from
its config.json (the vocabulary stays the test tokenizer's 384 tokens).

    python bench/bench_speculative.py [--tokens 96] [--repeats 2] [--config PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import Row, divergence, load_prompt, measure  # noqa: E402
from bench_model import REPO, default_cache_dir, parameter_count  # noqa: E402
from systems import (  # noqa: E402
    ControlServer,
    MlxLm,
    Pomona,
    Processes,
    Run,
    load_average,
    run_info,
    stop_on_signals,
)

T0 = time.monotonic()
DEFAULT_PROMPT = "The lab has four machines. Each machine holds some layers of the model."
SHAPE: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
LAYERS = 16
SCALES = (1.0, 0.5, 0.3, 0.2, 0.14, 0.1, 0.07, 0.05, 0.03, 0.02)
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=96, help="tokens to decode per request")
    p.add_argument("--repeats", type=int, default=2, help="measured requests per system")
    p.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the warm-up request")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument(
        "--layers", type=int, default=0, help="target layers (default 16, or --config's)"
    )
    p.add_argument(
        "--draft-layers", type=int, default=1, help="the target's layers the draft keeps"
    )
    p.add_argument("--num-draft-tokens", type=int, default=4, help="Pomona's --num-draft-tokens")
    p.add_argument("--acceptance", type=float, default=0.75, help="acceptance to calibrate for")
    p.add_argument("--config", type=Path, default=None, help="a real model's config.json shape")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="model cache")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    p.add_argument(
        "--costs",
        action="store_true",
        help="only measure, in this process pinned to one core, what a forward pass of the "
        "target's first half costs for 1 to 17 tokens per row and 1 to 4 rows: where "
        "verifying several tokens stops being free",
    )
    p.add_argument(
        "--random-draft",
        action="store_true",
        help="also run the cluster with a random draft (the worst case, never accepted)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1 or args.warmup_tokens < 1:
        p.error("--tokens must be at least 2, --repeats and --warmup-tokens at least 1")
    if not 0 < args.acceptance < 1:
        p.error("--acceptance is a share of drafted tokens: between 0 and 1")
    return args


# -- the pair ------------------------------------------------------------------


def target_shape(args: argparse.Namespace) -> tuple[str, dict[str, Any], int]:
    """(model_type, config overrides, layers) of the target."""
    if args.config is None:
        return "llama", dict(SHAPE), args.layers or LAYERS
    try:
        config = json.loads(args.config.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read --config {args.config}: {e}") from None
    config = {**config, **config.get("text_config", {})}
    arch = config.get("model_type", "llama")
    arch = arch if arch in ("llama", "qwen2", "qwen3") else "llama"
    shape = {k: config[k] for k in SHAPE_KEYS if k in config}
    shape["max_position_embeddings"] = 4096
    if "head_dim" not in shape and arch == "qwen3":
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    return arch, shape, args.layers or int(config["num_hidden_layers"])


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def _scaled(weights: dict[str, Any], draft_layers: int, scale: float) -> dict[str, Any]:
    import mlx.core as mx

    out = {}
    for name, w in weights.items():
        layer = _layer_of(name)
        weak = layer is not None and layer >= draft_layers
        if weak and (name.endswith("o_proj.weight") or name.endswith("down_proj.weight")):
            w = (w.astype(mx.float32) * scale).astype(w.dtype)
        out[name] = w
    return out


def _agreement(folder: Path, draft_layers: int, scale: float, prompt: Sequence[int]) -> float:
    """Greedy agreement of draft and target over the target's continuation (float32)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    model = load(str(folder))[0]
    weights = dict(_flat(model.parameters()))
    model.load_weights(list(_scaled(weights, draft_layers, scale).items()))
    tokens = list(prompt)
    for token, _ in generate_step(mx.array(tokens), model, max_tokens=48):
        tokens.append(int(token))
    inner = model.model
    x = mx.array(tokens)[None]
    h = inner.embed_tokens(x)
    for layer in inner.layers[:draft_layers]:
        h = layer(h, "causal", None)
    h = inner.norm(h)
    logits = model.lm_head(h) if hasattr(model, "lm_head") else inner.embed_tokens.as_linear(h)
    guess = mx.argmax(logits[0], axis=-1).tolist()
    start = len(prompt) - 1
    hits = [guess[i] == tokens[i + 1] for i in range(start, len(tokens) - 1)]
    return sum(hits) / len(hits)


def _flat(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return list(tree_flatten(tree, prefix))


def build_pair(args: argparse.Namespace, prompt_text: str) -> tuple[Path, Path, float, float]:
    """The target and draft folders (cached), the scale and its calibrated agreement."""
    import mlx.core as mx

    sys.path.insert(0, str(REPO / "tests"))
    from modelfactory import _write_shards, make_model

    arch, shape, layers = target_shape(args)
    if not 1 <= args.draft_layers < layers:
        raise SystemExit(f"--draft-layers must be 1 to {layers - 1}")
    key = "-".join(f"{shape[k]}" for k in SHAPE_KEYS if k in shape)
    root = args.cache_dir / f"speculative-{arch}-{key}-l{layers}-d{args.draft_layers}"
    base = root / f"base-{args.dtype}"
    if not (base / "tokenizer.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_model(base, arch, num_layers=layers, shards=2, dtype=args.dtype, overrides=shape)
        calibration = root / "base-float32"
        shutil.rmtree(calibration, ignore_errors=True)
        make_model(calibration, arch, num_layers=layers, shards=2, dtype="float32", overrides=shape)
    prompt = load_prompt(base, prompt_text)
    choice = root / f"scale-{args.acceptance}.json"
    if choice.exists():
        picked = json.loads(choice.read_text())
    else:
        found = []
        for scale in SCALES:
            agreement = _agreement(root / "base-float32", args.draft_layers, scale, prompt)
            print(f"  calibrating: scale {scale:<5} agreement {agreement:.2f}", flush=True)
            found.append((abs(agreement - args.acceptance), scale, agreement))
            if agreement > args.acceptance + 0.1:
                break
        _, scale, agreement = min(found)
        picked = {"scale": scale, "agreement": agreement}
        choice.write_text(json.dumps(picked))
    scale, agreement = picked["scale"], picked["agreement"]
    models = root / f"pair-{args.dtype}-s{scale}"
    target, draft = models / "target", models / "draft"
    if not (draft / "tokenizer.json").exists():
        shutil.rmtree(models, ignore_errors=True)
        weights: dict[str, Any] = {}
        for path in sorted(base.glob("*.safetensors")):
            weights.update(mx.load(str(path)))
        config = json.loads((base / "config.json").read_text())
        for folder, n, kept in (
            (target, layers, _scaled(weights, args.draft_layers, scale)),
            (
                draft,
                args.draft_layers,
                {
                    k: v
                    for k, v in weights.items()
                    if _layer_of(k) is None or _layer_of(k) < args.draft_layers  # type: ignore[operator]
                },
            ),
        ):
            folder.mkdir(parents=True)
            _write_shards(folder, kept, n, min(2, n))
            (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": n}))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(base / name, folder / name)
    return target, draft, scale, agreement


# -- the systems --------------------------------------------------------------


class Drafting(Pomona):
    """Pomona with a draft: also keeps what each request drafted and had accepted."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.drafted = 0
        self.accepted = 0
        self.counting = False

    def request(self, max_tokens: int, prompt: Sequence[int] | None = None) -> Run:
        run = super().request(max_tokens, prompt)
        usage = self.last_usage
        if usage is not None and self.counting:
            self.drafted += usage.drafted_tokens
            self.accepted += usage.accepted_tokens
        return run

    def tokens_per_verify(self) -> float | None:
        from pomona.v1 import coordinator_pb2

        reply = self._stub.Status(coordinator_pb2.StatusRequest(), timeout=10)
        return reply.tokens_per_verify_step if reply.HasField("tokens_per_verify_step") else None


def step_costs(target: Path, layers: int) -> None:
    """Median seconds of one stage's forward pass by rows and tokens per row."""
    import os

    os.sched_setaffinity(0, {0})
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load

    model = load(str(target))[0]
    model.model.layers = model.model.layers[: layers // 2]  # one of two stages
    print("ms per forward pass of half the target's layers (after a 64-token prompt):")
    print("rows  " + "".join(f"{w:>8} tok" for w in (1, 2, 3, 5, 9, 17)))
    for rows in (1, 2, 4):
        cache = make_prompt_cache(model)
        mx.eval(model(mx.zeros((rows, 64), dtype=mx.int32), cache=cache))
        line = f"{rows:>4}  "
        for width in (1, 2, 3, 5, 9, 17):
            times = []
            for _ in range(5):
                began = time.perf_counter()
                mx.eval(model(mx.ones((rows, width), dtype=mx.int32), cache=cache))
                times.append(time.perf_counter() - began)
                for c in cache:
                    c.trim(width)
            line += f"{1e3 * statistics.median(times):>12.1f}"
        print(line, flush=True)


def random_draft(args: argparse.Namespace, draft: Path) -> Path:
    """A draft of the same shape and tokenizer as ``draft`` with other random weights."""
    sys.path.insert(0, str(REPO / "tests"))
    from modelfactory import make_model

    folder = draft.parent / "random-draft"
    if not (folder / "tokenizer.json").exists():
        config = json.loads((draft / "config.json").read_text())
        arch, shape, _ = target_shape(args)
        make_model(
            folder, arch, num_layers=args.draft_layers, shards=1, seed=99,
            dtype=args.dtype, overrides=shape,
        )  # fmt: skip
        assert (
            json.loads((folder / "config.json").read_text())["hidden_size"] == config["hidden_size"]
        )
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(draft / name, folder / name)
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    target, draft, scale, agreement = build_pair(args, args.prompt)
    if args.costs:
        step_costs(target, target_shape(args)[2])
        return 0
    prompt = load_prompt(target, args.prompt)
    params, draft_params = parameter_count(target), parameter_count(draft)
    desc = (
        f"{target_shape(args)[0]}, {params / 1e6:.1f}M parameters, {args.dtype}; draft: its first "
        f"{args.draft_layers} layer(s), {draft_params / 1e6:.1f}M, later layers' output "
        f"projections x{scale} (calibrated agreement {agreement:.2f})"
    )
    print(f"target: {target}\ndraft: {draft}\n{desc}; prompt: {len(prompt)} tokens", flush=True)

    log_dir = Path(tempfile.mkdtemp(prefix="pomona-bench-"))
    processes = Processes(log_dir)
    control = ControlServer()
    layers = target_shape(args)[2]
    split = f"{layers // 2},{layers - layers // 2}"
    single = MlxLm("mlx-lm, 1 process", 1, control)
    plain = Pomona("Pomona, 2 workers", 2, split, options=["--http-port", "0"], tag="-plain")
    drafting = Drafting(
        "Pomona, 2 workers + draft",
        2,
        split,
        options=[
            *("--http-port", "0", "--draft-model", str(draft)),
            *("--num-draft-tokens", str(args.num_draft_tokens)),
        ],
        tag="-draft",
    )
    systems: list[MlxLm | Pomona] = [single, plain, drafting]
    if args.random_draft:
        # The worst draft: never agrees. The policy must keep the stream at the cluster's rate.
        systems.append(
            Pomona(
                "Pomona, 2 workers + random draft",
                2,
                split,
                options=["--http-port", "0", "--draft-model", str(random_draft(args, draft))],
                tag="-random",
            )
        )
    rows = [Row(s.name, s) for s in systems]
    load_before = load_average()
    with processes.measuring(args.keep_logs, stop=control.close):
        original = drafting.request

        def counted(max_tokens: int, prompt: Sequence[int] | None = None) -> Run:
            drafting.counting = max_tokens == args.tokens
            return original(max_tokens, prompt)

        drafting.request = counted  # type: ignore[method-assign]
        runs, _ = measure(systems, rows, processes, args, target, prompt)
        per_verify = drafting.tokens_per_verify()
    plain_runs = {k: runs[k] for k in (single.name, plain.name)}
    with_draft = {k: runs[k] for k in (single.name, drafting.name)}
    info = run_info(
        "bench_speculative.py",
        T0,
        desc,
        load_before,
        tokens_match=divergence(plain_runs),
        draft_tokens_match=divergence(with_draft),
    )
    mean = {label: statistics.mean(r.tps for r in rs) for label, rs in runs.items()}
    acceptance = drafting.accepted / drafting.drafted if drafting.drafted else 0.0
    ratios = {
        "draft_vs_cluster": mean[drafting.name] / mean[plain.name],
        "draft_vs_single": mean[drafting.name] / mean[single.name],
        "cluster_vs_single": mean[plain.name] / mean[single.name],
    }
    print(f"\nDecode tokens/s of one stream — {desc}")
    for label, rs in runs.items():
        tps = [r.tps for r in rs]
        print(f"  {label:<28} {mean[label]:7.2f} tok/s  ({min(tps):.2f} – {max(tps):.2f})")
    print(
        f"acceptance (accepted / drafted, measured requests): {acceptance:.2f} "
        f"({drafting.accepted}/{drafting.drafted}); tokens per verify step: "
        + (f"{per_verify:.2f}" if per_verify is not None else "n/a")
    )
    for text, key, goal in (
        ("with draft / same cluster without", "draft_vs_cluster", 1.5),
        ("with draft / mlx-lm, 1 process   ", "draft_vs_single", 1.2),
    ):
        verdict = "meets" if ratios[key] >= goal else "BELOW"
        print(f"{text}: {ratios[key]:.2f}  (target >= {goal}: {verdict})")
    print(f"cluster without draft / mlx-lm, 1 process: {ratios['cluster_vs_single']:.2f}")
    if args.random_draft:
        ratios["random_draft_vs_cluster"] = mean[systems[-1].name] / mean[plain.name]
        value = ratios["random_draft_vs_cluster"]
        verdict = "meets" if value >= 0.95 else "BELOW"
        print(f"random draft / same cluster without: {value:.2f}  (target >= 0.95: {verdict})")
    print(f"greedy tokens identical, systems without a draft: {info['tokens_match']}")
    print(f"greedy tokens identical, with the draft: {info['draft_tokens_match']}")
    if args.dtype != "float32":
        print(
            "  (in bfloat16/float16 a (k+1)-token verify pass rounds unlike a 1-token step, so "
            "a near-tie can flip; in float32 the tokens are the same: --dtype float32)"
        )
    print(
        f"load average before / after: {info['load_before']} / {info['load_after']} "
        f"({info['cpus']} CPUs)"
    )
    print(f"{info['date']}  {info['platform']}  mlx {info['mlx']}  mlx-lm {info['mlx_lm']}")
    print(f"command: {info['command']}\nwhole run: {info['seconds']:.0f} s")
    if args.json:
        result = {
            "info": info,
            "tps_mean": mean,
            "ratios": ratios,
            "acceptance": acceptance,
            "tokens_per_verify_step": per_verify,
            "scale": scale,
        }
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
