"""``ppwrap bench``: ppwrap against stock mlx-lm pipelining, on the same checkpoints.

Three variants run on each checkpoint, alternating, several times:

- ``stock``: the backbone's own ``model.model.pipeline(group)`` and mlx-lm's own
  ``stream_generate`` on every rank (PipelineMixin families only);
- ``ppwrap-head``: ``ppwrap.load(..., elide_output_head=False)`` and
  ``ppwrap.stream_generate``: every rank still runs the output head;
- ``ppwrap``: ``ppwrap.load(...)``: the head runs on the final rank only.

Three measurements per variant and rank count:

1. per-rank compute per decoded token: each rank's shard is loaded in this
   process with a stand-in group (no peers), and its decode step is timed with
   the communication replaced by local stand-ins of the same shape
   (:func:`local_only`). The step is what the generate loop runs on that rank:
   the backbone's local layers, plus the head and sampling where the variant
   runs them. A rank's *layers-only limit* is its local layers called alone,
   through their own class, on the same KV cache;
2. end-to-end prefill and decode tokens/s over 2 and 3 local ranks
   (:func:`ppwrap._launch.run_local`, ``ppwrap.bench.rank`` on each rank);
3. resident parameter bytes per rank, and how many of them are head weights.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .._version import __version__

if TYPE_CHECKING:
    from matplotlib.axes import Axes  # matplotlib is optional: the bench extra

__all__ = ["VARIANTS", "add_parser", "bench_prompt", "run"]

VARIANTS = ("stock", "ppwrap-head", "ppwrap")
LABELS = {
    "stock": "stock mlx-lm",
    "ppwrap-head": "ppwrap, head kept",
    "ppwrap": "ppwrap, head elided",
}

# The default checkpoint: qwen3_moe's shape with Qwen3's 151936-token vocabulary,
# every other dimension small so that it runs in seconds on a 2-core CPU.
MOE_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "hidden_size": 256,
    "num_hidden_layers": 6,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-06,
    "vocab_size": 151936,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "ppwrap_random_weights": True,
}
# Bump when MOE_CONFIG or the way the folder is written changes: cached copies
# from another version are rewritten.
MOE_VERSION = 1


# --------------------------------------------------------------------- models


@attrs.frozen(kw_only=True)
class BenchModel:
    """A checkpoint to benchmark.

    Attributes:
        name: A short name for tables and the chart.
        path: The checkpoint folder.
        model_type: The mlx-lm family.
        stock: Whether the family has mlx-lm's PipelineMixin (a stock variant).
        num_layers: The number of layers.
        config: The checkpoint's config.json.
    """

    name: str
    path: Path
    model_type: str
    stock: bool
    num_layers: int
    config: dict[str, Any] = attrs.field(eq=False, repr=False)


def describe_model(path: str | Path, *, name: str | None = None) -> BenchModel:
    """Read a checkpoint's config and find out whether stock mlx-lm can pipeline it.

    Args:
        path: An mlx-lm checkpoint folder.
        name: A short name; default the folder's name.

    Returns:
        The model's description.

    Raises:
        FileNotFoundError: The folder has no config.json.
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; --model takes an mlx-lm checkpoint folder."
        )
    config = json.loads((path / "config.json").read_text())
    model, _ = load_model(path, lazy=True, strict=False)
    backbone = getattr(model, "model", None)
    from .._adapter import resolve
    from .._pipeline import layer_list

    num_layers = len(layer_list(resolve(model)))
    del model
    mx.clear_cache()
    return BenchModel(
        name=name or path.name,
        path=path,
        model_type=str(config.get("model_type")),
        stock=callable(getattr(backbone, "pipeline", None)),
        num_layers=num_layers,
        config=config,
    )


def write_moe_checkpoint(path: Path, *, bits: int | None, seed: int = 0) -> Path:
    """Write the default random-weight qwen3_moe checkpoint, once.

    Args:
        path: The folder; kept as it is when it already holds this version.
        bits: Quantize to this many bits (group size 64), as ``mlx_lm.convert -q``
            does; ``None`` keeps float32 (MLX's CPU float16 matmul is several
            times slower than float32, which would make the head look bigger
            than it is).
        seed: Seed for the random weights.

    Returns:
        ``path``.
    """
    import mlx.core as mx
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import quantize_model, save_config, save_model

    from ..models.gguf import _train_tokenizer

    config_path = path / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("ppwrap_bench_version") == MOE_VERSION:
            return path
        shutil.rmtree(path)
    config = {**MOE_CONFIG, "ppwrap_bench_version": MOE_VERSION}
    mx.random.seed(seed)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    if bits is not None:
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to its place and renamed, so a killed run leaves no half folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_model(tmp, model)
        _train_tokenizer(tmp)
        save_config(config, tmp / "config.json")
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def default_models(progress: Callable[[str], None]) -> list[BenchModel]:
    """The default checkpoints: the large-vocabulary MoE in float32 and 4-bit,
    and SmolLM2-135M-Instruct when it is already cached (it is never downloaded here)."""
    from ..models.gguf import DEFAULT_MODEL_NAME, cache_dir

    root = cache_dir() / "bench"
    models = []
    for bits, suffix in ((None, "f32"), (4, "q4")):
        path = root / f"qwen3_moe-v151936-{suffix}"
        if not (path / "config.json").is_file():
            progress(f"writing a random-weight qwen3_moe checkpoint to {path}")
        write_moe_checkpoint(path, bits=bits)
        models.append(describe_model(path, name=f"qwen3_moe-{suffix}"))
    smol = cache_dir() / DEFAULT_MODEL_NAME
    if (smol / "config.json").is_file():
        models.append(describe_model(smol, name="SmolLM2-135M"))
    else:
        progress(f"{smol} is not cached: skipping it (run `ppwrap demo` once to fetch it)")
    return models


def bench_prompt(vocab_size: int, length: int) -> list[int]:
    """The same deterministic prompt of token ids for every variant and rank."""
    span = max(2, min(vocab_size, 1000))
    return [(17 + 7919 * i) % span for i in range(length)]


# ------------------------------------------------------- per-rank compute


class FakeGroup:
    """A stand-in for ``mx.distributed.Group``: a rank and a size, and no peers."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank = rank
        self._size = size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@contextmanager
def local_only() -> Iterator[None]:
    """Replace the pipelines' communication by local stand-ins of the same shape.

    Both pipelines look the functions up on ``mx.distributed`` at each call, so
    inside this block a send returns what it was given, a receive returns zeros
    of the expected shape, and a gather returns this rank's share: the rest of
    the step is exactly the code that runs on the rank.
    """
    import mlx.core as mx

    dist = mx.distributed
    saved = dist.send, dist.recv_like, dist.all_gather

    def send(x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return x

    def recv_like(x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return mx.zeros(x.shape, x.dtype)

    dist.send, dist.recv_like, dist.all_gather = send, recv_like, send
    try:
        yield
    finally:
        dist.send, dist.recv_like, dist.all_gather = saved


@attrs.define(kw_only=True)
class Shard:
    """One variant's shard of one rank, loaded alone.

    Attributes:
        model: The mlx-lm model, split for this rank.
        step: Runs one generate-loop step on this rank: ``step(tokens, cache)``
            returns what the loop evaluates.
        prefill: Fills a cache with the prompt, as the loop's prefill does.
        make_cache: A fresh prompt cache for ``step``.
        local: This rank's layers with their global indices.
        resident_bytes: Bytes of the parameters the rank holds.
        head_bytes: Bytes of output-head weights the rank holds (the tied
            embedding's when the head is tied).
        hidden: ``(dims, dtype)`` of the hidden state.
    """

    model: Any
    step: Callable[[Any, list[Any]], Any]
    prefill: Callable[[Any, list[Any]], None]
    make_cache: Callable[[], list[Any]]
    local: list[tuple[int, Any]]
    resident_bytes: int
    head_bytes: int
    hidden: tuple[int, Any]


def _sample(logits: Any) -> Any:
    """What both generate loops do with the logits at greedy decoding."""
    import mlx.core as mx

    last = logits[:, -1, :]
    logprobs = last - mx.logsumexp(last, keepdims=True)
    return mx.argmax(logprobs, axis=-1)


def _param_bytes(model: Any) -> int:
    from ppwrap._pipeline import nbytes

    return nbytes(model)


def load_shard(path: Path, variant: str, *, rank: int, size: int) -> Shard:
    """Load one variant's shard of ``rank`` in this process, with no peers.

    ``stock`` is mlx-lm's ``sharded_load`` after its download step; the ppwrap
    variants are ``ppwrap.load`` without its handshake and barrier (they need
    peers), split by ``ppwrap.pipeline`` with ``handshake=False``.

    Args:
        path: The checkpoint folder.
        variant: One of :data:`VARIANTS`.
        rank: The rank to load (0 runs the last layers).
        size: The number of ranks.

    Returns:
        The loaded shard.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from .._head import PipelineHead
    from .._pipeline import drop_head, layer_list, pipeline

    group = FakeGroup(rank, size)
    if variant == "stock":
        model, _ = load_model(path, lazy=True, strict=False)
        model.model.pipeline(group)
        mx.eval(model.parameters())
        bb = model.model
        local = list(zip(range(bb.start_idx, bb.end_idx), bb.pipeline_layers, strict=True))
        wrapped = PipelineHead.wrap(model)

        def step(tokens: Any, cache: list[Any]) -> Any:
            return _sample(model(tokens, cache=cache))  # mlx-lm samples on every rank

        def prefill(tokens: Any, cache: list[Any]) -> None:
            model(tokens, cache=cache)
            mx.eval([c.state for c in cache])

        def fresh() -> list[Any]:
            cache: list[Any] = make_prompt_cache(model)
            return cache

    else:
        elide = variant == "ppwrap"
        model, _ = load_model(path, lazy=True)
        # As ppwrap.load does: with the head kept, a tied head's embedding
        # stays on every rank.
        pipeline(model, group, handshake=False, head_on_every_rank=not elide)  # type: ignore[arg-type]
        head = PipelineHead.wrap(model, elide_output_head=elide, group=group)  # type: ignore[arg-type]
        if elide and not head.is_final:
            drop_head(head.parts)
        mx.eval(model.parameters())
        stage = head.stage
        assert stage is not None
        layers = layer_list(head.parts)
        local = [(i, layers[i]) for i in range(stage.start, stage.end)]
        wrapped = PipelineHead.wrap(model)
        final = head.is_final

        def step(tokens: Any, cache: list[Any]) -> Any:
            out = head(tokens, cache=cache)
            # ppwrap samples on the final rank only; elsewhere the loop
            # evaluates what the rank returned (through the token broadcast).
            return _sample(out) if final else out

        def prefill(tokens: Any, cache: list[Any]) -> None:
            mx.eval(head.hidden_states(tokens, cache=cache), [c.state for c in cache])

        def fresh() -> list[Any]:
            return head.make_cache()

    embedding = wrapped.parts.embedding
    assert embedding is not None, "every benchmarked family has an input embedding"
    probe = embedding(mx.zeros((1, 1), dtype=mx.int32))
    return Shard(
        model=model,
        step=step,
        prefill=prefill,
        make_cache=fresh,
        local=local,
        resident_bytes=_param_bytes(model),
        head_bytes=wrapped.head_read_bytes(),
        hidden=(int(probe.shape[-1]), probe.dtype),
    )


def _own_call(layer: Any) -> Callable[..., Any]:
    """The layer's own ``__call__``, past any class ppwrap mixed into it."""
    for cls in type(layer).__mro__:
        if cls.__module__ != "ppwrap._pipeline":
            return cls.__call__.__get__(layer)  # type: ignore[no-any-return]
    raise TypeError(f"{type(layer)} has no class of its own")


def _variant_steps(shard: Shard, prompt: Any, token: Any) -> Callable[[], Any]:
    """Prefill a fresh cache for ``shard``; return its decode step."""
    cache = shard.make_cache()
    shard.prefill(prompt, cache)
    return lambda: shard.step(token, cache)


def _layers_steps(shard: Shard, prompt_len: int) -> Callable[[], Any]:
    """Prefill fresh caches for the rank's local layers alone; return their decode step."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask

    dims, dtype = shard.hidden
    full = shard.make_cache()
    # ppwrap's cache lists every layer, mlx-lm's only the local ones.
    offset = shard.local[0][0] if len(full) == len(shard.local) else 0
    caches = [full[i - offset] for i, _ in shard.local]
    calls = [_own_call(layer) for _, layer in shard.local]
    key = mx.random.key(0)
    h_prompt = mx.random.normal((1, prompt_len, dims), key=key).astype(dtype)
    h_token = mx.random.normal((1, 1, dims), key=key).astype(dtype)

    def run(h: Any) -> Any:
        mask = create_attention_mask(h, caches[0])
        for call, c in zip(calls, caches, strict=True):
            h = call(h, mask, c)
        return h

    mx.eval(run(h_prompt), [c.state for c in caches])
    return lambda: run(h_token)


def _interleaved(
    steps_of: dict[str, Callable[[], Any]], *, steps: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per decode step of each entry, their steps interleaved.

    Step ``i`` of every entry runs before step ``i + 1`` of any, so a change in
    the machine's background load touches all entries alike. Each timed step
    directly follows an untimed step of the same entry, as a step follows the
    previous token's in a generate loop: its weights are as warm in the CPU
    caches as there (or as cold, after a head that evicts them). Timing a step
    right after another entry's instead favours whichever entry happens to run
    twice in a row where the order reverses, or shares its predecessor's weights.
    """
    import mlx.core as mx

    times: dict[str, list[float]] = {k: [] for k in steps_of}
    names = list(steps_of)
    for i in range(warmup + steps):
        for name in names if i % 2 == 0 else reversed(names):
            mx.eval(steps_of[name]())
            tic = time.perf_counter()
            mx.eval(steps_of[name]())
            if i >= warmup:
                times[name].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in times.items()}


def _role(rank: int, size: int) -> str:
    if rank == 0:
        return "final"
    return "first" if rank == size - 1 else "middle"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def measure_compute(
    model: BenchModel,
    size: int,
    *,
    variants: Sequence[str],
    repeats: int,
    steps: int,
    prompt_tokens: int,
    progress: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Per-rank compute per decoded token and resident bytes, every rank alone.

    Every variant's shard of a rank is loaded at once; each sample prefills a
    fresh cache for each and interleaves their decode steps (and the
    layers-only steps), and reports the median step.

    Args:
        model: The checkpoint.
        size: The number of ranks.
        variants: The variants to load.
        repeats: Samples per variant.
        steps: Decode steps per sample.
        prompt_tokens: Tokens in the KV cache before the timed steps.
        progress: Called with a status line.

    Returns:
        One entry per rank, and the variants that failed on some rank with
        their error (they are left out of that rank's entry).
    """
    import gc

    import mlx.core as mx

    vocab = int(model.config.get("vocab_size") or 1000)
    prompt = mx.array([bench_prompt(vocab, prompt_tokens)])
    token = prompt[:, -1:]
    ranks = []
    errors: dict[str, str] = {}
    for rank in range(size):
        progress(f"{model.name}: per-rank compute, rank {rank} of {size}")
        shards = {}
        with local_only():
            for v in variants:
                try:
                    shard = load_shard(model.path, v, rank=rank, size=size)
                    mx.eval(_variant_steps(shard, prompt, token)())  # one trial step
                    shards[v] = shard
                except Exception as e:  # a variant that cannot run is reported, not fatal
                    errors[v] = f"rank {rank} of {size}: {_error(e)}"
                    progress(f"{model.name}: {v} fails on rank {rank} of {size}: {errors[v]}")
            if not shards:
                continue
            layers_of = next(iter(shards.values()))
            samples: dict[str, list[float]] = {k: [] for k in (*shards, "layers-only")}
            for _ in range(repeats):
                steps_of = {v: _variant_steps(sh, prompt, token) for v, sh in shards.items()}
                steps_of["layers-only"] = _layers_steps(layers_of, prompt_tokens)
                for k, t in _interleaved(steps_of, steps=steps).items():
                    samples[k].append(t * 1e3)
        limit = statistics.median(samples["layers-only"])
        entry: dict[str, Any] = {
            "rank": rank,
            "role": _role(rank, size),
            "layers": [layers_of.local[0][0], layers_of.local[-1][0] + 1],
            "layers_only_ms": _stats(samples["layers-only"]),
            "variants": {},
        }
        for v, shard in shards.items():
            ms = _stats(samples[v])
            entry["variants"][v] = {
                "ms_per_token": ms,
                "ratio_to_layers_only": ms["median"] / limit,
                "resident_bytes": shard.resident_bytes,
                "head_bytes": shard.head_bytes,
            }
        ranks.append(entry)
        del shards, steps_of, layers_of
        gc.collect()
        mx.clear_cache()
    return ranks, errors


def _stats(samples: Sequence[float]) -> dict[str, Any]:
    return {"samples": list(samples), "median": statistics.median(samples), "min": min(samples)}


# ---------------------------------------------------------- end to end


# mlx-lm and ppwrap make their generation streams on the default device when
# they are imported, so a rank that computes on the CPU picks it before it
# imports either (``python -m ppwrap.bench.rank`` would import ppwrap first).
_ON_CPU = (
    "import mlx.core as mx; mx.set_default_device(mx.cpu); "
    "from ppwrap.bench.rank import main; raise SystemExit(main())"
)


def _run_ranks(
    model: BenchModel,
    size: int,
    argv: list[str],
    *,
    timeout: float,
    link_delay: float | None,
    device: str | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Run ``ppwrap.bench.rank`` with ``argv`` on ``size`` local ranks, on
    ``device`` ("cpu", or ``None`` for MLX's default): each rank's results,
    and the launch's seconds."""
    from .._launch import run_local

    start = ["-c", _ON_CPU] if device == "cpu" else ["-m", "ppwrap.bench.rank"]
    with tempfile.TemporaryDirectory(prefix="ppwrap-bench-") as out:
        argv = [*start, "--model", str(model.path), "--out", out, *argv]
        run = run_local(size, argv, timeout=timeout, capture=True, link_delay=link_delay)
        found: list[dict[str, Any] | None] = []
        for r in range(size):
            path = Path(out) / f"rank{r}.json"
            found.append(json.loads(path.read_text()) if path.is_file() else None)
    results = [r for r in found if r is not None]
    if run.returncode != 0 or len(results) != size:
        what = f"timed out after {timeout:.0f} s" if run.timed_out else "failed"
        tails = "\n".join(
            f"--- rank {r} (exit {code}) ---\n{run.stdout[r][-1500:]}{run.stderr[r][-2500:]}"
            for r, code in enumerate(run.returncodes)
        )
        raise RuntimeError(
            f"the end-to-end run of {model.name} on {size} ranks {what} "
            f"(raise --timeout if it was only slow):\n{tails}"
        )
    return results, run.seconds


def _rank_argv(variants: Sequence[str], repeats: int, tokens: int, prompt_tokens: int) -> list[str]:
    argv = ["--variants", ",".join(variants), "--repeats", str(repeats)]
    return argv + ["--tokens", str(tokens), "--prompt-tokens", str(prompt_tokens)]


def _summary(
    results: list[dict[str, Any]],
    seconds: float,
    variants: Sequence[str],
    link: Link | None = None,
) -> dict[str, Any]:
    """Medians per variant of the samples rank 0 (the final rank) took behind
    ``link`` (delay in ms, megabits per second or ``None``)."""
    final = results[0]
    key = link or (None, None)  # samples without a relay have neither
    entry: dict[str, Any] = {"seconds": seconds, "device": final.get("device"), "variants": {}}
    for v in variants:
        every = final["variants"][v]["samples"]
        samples = [s for s in every if (s.get("delay_ms"), s.get("mbps")) == key]
        entry["variants"][v] = {
            "decode_tps": _stats([s["decode_tps"] for s in samples]),
            "prefill_tps": _stats([s["prefill_tps"] for s in samples]),
            "resident_bytes_per_rank": [r["variants"][v]["resident_bytes"] for r in results],
            "tokens": final["variants"][v]["tokens"],
        }
    first = entry["variants"][variants[0]]["tokens"]
    entry["same_tokens"] = all(entry["variants"][v]["tokens"] == first for v in variants)
    base = variants[0]  # stock where it runs: VARIANTS order
    entry["ratios"] = {
        f"{v}/{base}": {
            k: entry["variants"][v][k]["median"] / entry["variants"][base][k]["median"]
            for k in ("decode_tps", "prefill_tps")
        }
        for v in variants
        if v != base
    }
    return entry


def measure_end_to_end(
    model: BenchModel,
    size: int,
    *,
    variants: Sequence[str],
    repeats: int,
    tokens: int,
    prompt_tokens: int,
    timeout: float,
    device: str | None = None,
) -> dict[str, Any]:
    """Prefill and decode tokens/s of every variant over ``size`` local ranks.

    One run of ``ppwrap.bench.rank`` on ``size`` ranks loads every variant
    and alternates their generations (see that module).

    Args:
        model: The checkpoint.
        size: The number of ranks.
        variants: The variants to run.
        repeats: Generations per variant.
        tokens: Tokens to decode per generation.
        prompt_tokens: Prompt length.
        timeout: Seconds before the run is killed.
        device: "cpu" to compute on the CPU; ``None``: MLX's default device.

    Returns:
        Samples and medians per variant, as rank 0 (the final rank) measured them.

    Raises:
        RuntimeError: The run failed or timed out; the message has each rank's output.
    """
    argv = _rank_argv(variants, repeats, tokens, prompt_tokens)
    results, seconds = _run_ranks(
        model, size, argv, timeout=timeout, link_delay=None, device=device
    )
    return _summary(results, seconds, variants)


def measure_delays(
    model: BenchModel,
    size: int,
    *,
    variants: Sequence[str],
    links: Sequence[Link],
    repeats: int,
    tokens: int,
    prompt_tokens: int,
    timeout: float,
    device: str | None = None,
) -> dict[Link, dict[str, Any]]:
    """:func:`measure_end_to_end` behind a delaying relay, at each of ``links``
    (delay in ms, and a bandwidth limit in megabits per second or ``None``).

    One launch: the ranks change the relay's delay and rate between rounds
    (see ``ppwrap.bench.rank``), so every link is measured with the same
    processes.

    Returns:
        Per link, what :func:`measure_end_to_end` returns.
    """
    argv = _rank_argv(variants, repeats, tokens, prompt_tokens)
    entries = [f"{d!r}" if mbps is None else f"{d!r}@{mbps!r}" for d, mbps in links]
    argv += ["--delays", ",".join(entries)]
    results, seconds = _run_ranks(model, size, argv, timeout=timeout, link_delay=0.0, device=device)
    return {link: _summary(results, seconds, variants, link) for link in links}


# ------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import mlx.core as mx

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "mlx_device": str(mx.default_device()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"ppwrap": __version__, "python": sys.version.split()[0]}
    for dist in ("mlx", "mlx-lm", "mlx-metal", "mlx-cpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def table(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    lines = []
    for m in report["models"]:
        lines.append(f"== {m['name']} ({m['model_type']}, {m['path']})")
        if m.get("skipped"):
            for v, why in m["skipped"].items():
                lines.append(f"   no {v} variant: {why}")
        for run in m["runs"]:
            n = run["ranks"]
            e2e = run.get("end_to_end")
            lines.append(f"-- {n} ranks")
            for what, why in run.get("errors", {}).items():
                lines.append(f"   FAILED {what}: {why.splitlines()[0]}")
            if e2e is not None:
                lines.append(
                    f"   {'variant':<22}{'decode tok/s':>14}{'prefill tok/s':>15}{'vs base':>16}"
                )
                for v, stats in e2e["variants"].items():
                    ratio = next(
                        (r for k, r in e2e["ratios"].items() if k.startswith(v + "/")), None
                    )
                    rel = (
                        f"{ratio['decode_tps']:.2f}x / {ratio['prefill_tps']:.2f}x"
                        if ratio
                        else "base"
                    )
                    lines.append(
                        f"   {LABELS[v]:<22}{stats['decode_tps']['median']:>14.1f}"
                        f"{stats['prefill_tps']['median']:>15.1f}{rel:>16}"
                    )
                lines.append(f"   same tokens in every variant: {e2e['same_tokens']}")
            lines.append(
                f"   {'rank':<14}{'variant':<22}{'ms/token':>10}{'layers-only':>13}"
                f"{'ratio':>8}{'params MB':>11}{'head MB':>9}"
            )
            for r in run["per_rank"]:
                for v, s in r["variants"].items():
                    lines.append(
                        f"   {str(r['rank']) + ' ' + r['role']:<14}{LABELS[v]:<22}"
                        f"{s['ms_per_token']['median']:>10.2f}"
                        f"{r['layers_only_ms']['median']:>13.2f}"
                        f"{s['ratio_to_layers_only']:>8.2f}"
                        f"{s['resident_bytes'] / 1e6:>11.1f}{s['head_bytes'] / 1e6:>9.1f}"
                    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------- the chart

COLORS = {"stock": "#c8523c", "ppwrap-head": "#f0b43c", "ppwrap": "#326ec8"}
CHART_HINT = 'pip install "ppwrap[bench]"'


def _panels(report: dict[str, Any]) -> list[tuple[str, list[tuple[str, dict[str, float]]]]]:
    """(title, [(group label, {variant: value})]) for each chart panel."""
    decode, prefill, compute, memory = [], [], [], []
    for m in report["models"]:
        for run in m["runs"]:
            label = f"{m['name']} {run['ranks']}R"
            e2e = run.get("end_to_end")
            if e2e is not None:
                decode.append(
                    (label, {v: s["decode_tps"]["median"] for v, s in e2e["variants"].items()})
                )
                prefill.append(
                    (label, {v: s["prefill_tps"]["median"] for v, s in e2e["variants"].items()})
                )
            for r in run["per_rank"]:
                if r["role"] == "final":
                    continue
                rl = f"{m['name']} {run['ranks']}R R{r['rank']}"
                compute.append(
                    (rl, {v: s["ratio_to_layers_only"] for v, s in r["variants"].items()})
                )
                memory.append(
                    (rl, {v: s["resident_bytes"] / 1e6 for v, s in r["variants"].items()})
                )
    return [
        ("end-to-end decode tokens/s (higher is better)", decode),
        ("end-to-end prefill tokens/s (higher is better)", prefill),
        ("non-final rank compute per token / its layers-only limit (1.0 is the limit)", compute),
        ("non-final rank resident parameters, MB", memory),
    ]


def chart(report: dict[str, Any]) -> bytes:
    """The report as grouped bar charts, one panel per measurement, as PNG bytes.

    Args:
        report: What ``ppwrap bench`` writes to bench.json.

    Returns:
        The PNG file's bytes.

    Raises:
        ImportError: matplotlib is not installed (``pip install "ppwrap[bench]"``).
    """
    # Figure and the Agg canvas, not pyplot: no global state and no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [(t, g) for t, g in _panels(report) if g]
    groups = max((len(g) for _, g in panels), default=1)
    fig = Figure(
        figsize=(max(6.0, 2.0 + 1.2 * groups), 1.0 + 2.6 * max(1, len(panels))),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    fig.suptitle("ppwrap bench: " + report["created"][:16])
    fig.legend(
        handles=[Patch(color=COLORS[v], label=LABELS[v]) for v in VARIANTS],
        loc="outside lower center",
        ncols=len(VARIANTS),
        frameon=False,
    )
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, (title, rows) in zip(axes, panels, strict=False):
        _bars(ax, title, rows)
    if not panels:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no results", ha="center", va="center")
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _bars(ax: Axes, title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    """Draw one panel: a group of bars per row, a bar per variant, in VARIANTS order."""
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        # A variant missing from a group leaves its slot empty.
        xs = [g for g, (_, vals) in enumerate(rows) if v in vals]
        values = [rows[x][1][v] for x in xs]
        offset = (i - (len(VARIANTS) - 1) / 2) * width
        bars = ax.bar([x + offset for x in xs], values, width, color=COLORS[v])
        ax.bar_label(bars, [f"{y:.0f}" if y >= 10 else f"{y:.2f}" for y in values], fontsize=7)
    if title.startswith("non-final rank compute"):
        ax.axhline(1.0, color="0.45", linewidth=1, linestyle="--")
    ax.set_title(title, loc="left", fontsize=10)
    # The model name on one line and the ranks under it, since groups are narrow.
    ax.set_xticks(range(len(rows)), [label.replace(" ", "\n", 1) for label, _ in rows])
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)


# ------------------------------------------------------------- the command


# A link between ranks: (delay in ms each way, megabits per second each way or None).
Link = tuple[float, float | None]

# Link hops per decoded token on N ranks: what each pipeline's messages imply.
HOPS = {
    # N - 1 stage sends, then an all_gather of the hidden state. MLX's ring
    # gathers leftwards, so its first step hands the final rank's (rank 0's)
    # state to the first stage (rank N - 1) in one hop; the other pieces were
    # ready earlier and follow close behind.
    "stock": lambda n: n,
    # N - 1 stage sends and the token back to the first stage.
    "ppwrap": lambda n: n,
    "ppwrap-head": lambda n: n,
}


def measure_links(
    models: Sequence[BenchModel], args: argparse.Namespace, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Per-token decode time of each variant behind links of each delay.

    Every (model, ranks) is one launch that runs all variants at every delay,
    alternating (:func:`measure_delays`); the time a link adds is the
    difference with the same launch's generations through the relay without
    delay or bandwidth limit (so the relay's own forwarding cost cancels), and
    without a bandwidth limit, the hops it implies that difference over the
    delay. With ``--link-mbps`` every delay listed is also limited to that
    bandwidth each way, so the difference counts the bytes too.
    """
    rows = []
    mbps = args.link_mbps
    base_link: Link = (0.0, None)
    links = [base_link, *((float(d), mbps) for d in sorted(set(args.link_delay)))]
    links = list(dict.fromkeys(links))  # 0 ms without a limit is the baseline already
    delays = [d for d, _ in links]
    for model in models:
        variants = ["stock", "ppwrap"] if model.stock else ["ppwrap"]
        for n in args.ranks:
            on = " (on the CPU)" if args.device == "cpu" else ""
            listed = ", ".join(f"{d:g}" for d in sorted(set(delays)))
            limit = f" at {mbps:g} Mbit/s" if mbps is not None else ""
            say(f"{model.name}: {n} ranks, links delayed {listed} ms{limit}{on}")
            entries = measure_delays(
                model,
                n,
                variants=variants,
                links=links,
                repeats=args.repeats,
                tokens=args.tokens,
                prompt_tokens=args.prompt_tokens,
                timeout=args.timeout,
                device=args.device,
            )
            base = {
                v: 1000 / entries[base_link]["variants"][v]["decode_tps"]["median"]
                for v in variants
            }
            for (delay_ms, link_mbps), entry in entries.items():
                row: dict[str, Any] = {
                    "model": model.name,
                    "ranks": n,
                    "delay_ms": delay_ms,
                    "mbps": link_mbps,
                    "device": entry["device"],
                    "same_tokens": entry["same_tokens"],
                    "variants": {},
                }
                for v in variants:
                    decode = entry["variants"][v]["decode_tps"]
                    prefill = entry["variants"][v]["prefill_tps"]
                    ms = 1000 / decode["median"]
                    added = ms - base[v]
                    row["variants"][v] = {
                        # The prompt and the first decode step (see bench.rank.timed).
                        "first_token_ms": 1000 * args.prompt_tokens / prefill["median"],
                        "ms_per_token": ms,
                        "ms_per_token_samples": [1000 / x for x in decode["samples"]],
                        "link_ms_per_token": added,
                        "implied_hops": added / delay_ms
                        if delay_ms and link_mbps is None
                        else None,
                        "expected_hops": HOPS[v](n),
                    }
                rows.append(row)
    return rows


def link_table(rows: Sequence[dict[str, Any]]) -> str:
    """The link-delay results as plain text."""
    lines = [
        "   model                    ranks  delay    Mbit/s  variant  first ms  ms/token  link ms  "
        "hops (expected)"
    ]
    for row in rows:
        mbps = "" if row.get("mbps") is None else f"{row['mbps']:g}"
        for v, r in row["variants"].items():
            hops = "" if r["implied_hops"] is None else f"{r['implied_hops']:.2f}"
            lines.append(
                f"   {row['model'][:24]:<24} {row['ranks']:>5} {row['delay_ms']:>4g} ms "
                f"{mbps:>8}  {v:<7} {r['first_token_ms']:>9.1f} "
                f"{r['ms_per_token']:>9.2f} {r['link_ms_per_token']:>8.2f}  {hops:>5} "
                f"({r['expected_hops']})"
            )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run ``ppwrap bench`` with parsed arguments; return the exit code.

    Args:
        args: The parsed ``bench`` arguments.

    Returns:
        0 on success, 2 for bad arguments, 1 when an end-to-end run failed
        (the report is still written, with the error).
    """
    if any(n < 2 for n in args.ranks):
        print(
            f"ppwrap bench: --ranks takes counts of at least 2; got {args.ranks}", file=sys.stderr
        )
        return 2
    if args.tokens < 2 or args.repeats < 1 or args.prompt_tokens < 2:
        print(
            "ppwrap bench: --tokens and --prompt-tokens must be at least 2 and --repeats at least 1",
            file=sys.stderr,
        )
        return 2

    def say(message: str) -> None:
        print(f"ppwrap bench: {message}", flush=True)

    if args.device == "cpu":
        import mlx.core as mx

        mx.set_default_device(mx.cpu)  # this process's compute figures; ranks: _ON_CPU

    try:
        models = (
            [describe_model(p) for p in args.model] if args.model else default_models(progress=say)
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"ppwrap bench: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": ["ppwrap", *(args.argv if args.argv is not None else sys.argv[1:])],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "ranks": list(args.ranks),
            "tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens,
            "repeats": args.repeats,
            "compute_steps": args.compute_steps,
            "device": args.device,
        },
        "models": [],
    }
    if args.link_mbps is not None and (not args.link_delay or not args.link_mbps > 0):
        print(
            "ppwrap bench: --link-mbps takes a bandwidth > 0 and needs --link-delay; "
            f"got {args.link_mbps} with --link-delay {args.link_delay}",
            file=sys.stderr,
        )
        return 2
    if args.link_delay:
        if any(d < 0 for d in args.link_delay):
            print(
                f"ppwrap bench: --link-delay takes delays >= 0; got {args.link_delay}",
                file=sys.stderr,
            )
            return 2
        report["settings"]["link_delay_ms"] = list(args.link_delay)
        report["settings"]["link_mbps"] = args.link_mbps
        try:
            report["links"] = measure_links(models, args, say)
        except RuntimeError as e:
            print(f"ppwrap bench: {e}", file=sys.stderr)
            return 1
        finally:
            (out / "bench.json").write_text(json.dumps(report, indent=1))
        print(link_table(report["links"]), end="")
        say(f"wrote {out / 'bench.json'}")
        return 0
    status = 0
    for model in models:
        too_many = [n for n in args.ranks if n > model.num_layers]
        if too_many:
            print(
                f"ppwrap bench: {model.name} has {model.num_layers} layers; "
                f"it cannot run on {too_many} ranks. Choose --ranks up to {model.num_layers}.",
                file=sys.stderr,
            )
            return 2
        variants = [v for v in VARIANTS if v != "stock" or model.stock]
        entry: dict[str, Any] = {
            "name": model.name,
            "path": str(model.path),
            "model_type": model.model_type,
            "num_layers": model.num_layers,
            "vocab_size": model.config.get("vocab_size"),
            "hidden_size": model.config.get("hidden_size"),
            "quantization": model.config.get("quantization"),
            "variants": variants,
            "skipped": {}
            if model.stock
            else {"stock": f"{model.model_type} has no PipelineMixin in mlx-lm"},
            "runs": [],
        }
        if not model.stock:
            say(f"{model.name}: no stock variant ({entry['skipped']['stock']})")
        report["models"].append(entry)
        for n in args.ranks:
            per_rank, errors = measure_compute(
                model,
                n,
                variants=variants,
                repeats=args.repeats,
                steps=args.compute_steps,
                prompt_tokens=args.prompt_tokens,
                progress=say,
            )
            run_entry: dict[str, Any] = {"ranks": n, "errors": errors, "per_rank": per_rank}
            entry["runs"].append(run_entry)
            # A variant that failed alone would fail the multi-rank run too.
            working = [v for v in variants if v not in errors]
            say(f"{model.name}: end to end on {n} ranks")
            try:
                run_entry["end_to_end"] = measure_end_to_end(
                    model,
                    n,
                    variants=working,
                    repeats=args.repeats,
                    tokens=args.tokens,
                    prompt_tokens=args.prompt_tokens,
                    timeout=args.timeout,
                    device=args.device,
                )
            except (RuntimeError, KeyError) as e:
                print(f"ppwrap bench: {e}", file=sys.stderr)
                run_entry["end_to_end"] = None
                run_entry["errors"]["end_to_end"] = str(e)[:4000]
                status = 1
            # Written after every run, so an interrupted bench keeps what it measured.
            (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(table(report), end="")
    drawn = write_chart(report, out / "bench.png", say)
    say(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}" if drawn else ""))
    return status


def write_chart(report: dict[str, Any], path: Path, say: Callable[[str], None]) -> bool:
    """Write the report's chart to ``path``, or say how to get it without matplotlib.

    Args:
        report: What ``ppwrap bench`` writes to bench.json.
        path: The PNG file to write.
        say: Called with one line when the chart is skipped.

    Returns:
        Whether the chart was written.
    """
    try:
        png = chart(report)
    except ImportError as e:
        say(f"skipped {path.name}: the chart needs matplotlib ({e}); {CHART_HINT} draws it")
        return False
    path.write_bytes(png)
    return True


def add_parser(subparsers: Any) -> None:
    """Add the ``bench`` sub-command to an argparse ``subparsers`` object.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned.
    """
    p = subparsers.add_parser(
        "bench",
        help="benchmark ppwrap against stock mlx-lm pipelining",
        description="Per-rank compute, end-to-end tokens/s and resident parameters of "
        "stock mlx-lm pipelining, ppwrap with the head kept and ppwrap with the head "
        "elided, on the same checkpoints, alternating, with medians. Writes bench.json "
        f"and bench.png (the chart needs matplotlib: {CHART_HINT}).",
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        help="mlx-lm checkpoint folders (default: a random large-vocabulary qwen3_moe "
        "in float32 and 4-bit, and SmolLM2-135M if cached)",
    )
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 3], help="rank counts (default 2 3)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to decode per run (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="samples per variant (default 3)")
    p.add_argument(
        "--compute-steps", type=int, default=16, help="decode steps per compute sample (default 16)"
    )
    p.add_argument(
        "--link-delay",
        nargs="+",
        type=float,
        default=None,
        metavar="MS",
        help="instead of the usual figures: per-token decode time of stock mlx-lm and "
        "ppwrap with every byte between ranks delayed by MS milliseconds each way (a "
        "delaying TCP relay on loopback), for each MS and without delay (all in one "
        "launch per rank count), and the link hops per token that implies",
    )
    p.add_argument(
        "--link-mbps",
        type=float,
        default=None,
        metavar="MBPS",
        help="with --link-delay: also limit every delayed link to MBPS megabits per second "
        "each way (the baseline stays without delay or limit), so that the bytes each "
        "pipeline sends per token count too",
    )
    p.add_argument(
        "--device",
        choices=["cpu"],
        default=None,
        help="compute on the CPU, every rank and every variant alike, even where MLX has a "
        "GPU (default: MLX's default device); on a host with a core or more per rank this "
        "gives each rank a device of its own, where ranks sharing one GPU take turns on it",
    )
    p.add_argument("--out", default=None, help="output folder (default bench-<time>)")
    p.add_argument(
        "--timeout", type=float, default=900, help="seconds before a multi-rank run is killed"
    )
    p.set_defaults(run=run, argv=None)
