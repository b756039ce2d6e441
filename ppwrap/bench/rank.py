"""One rank of ``ppwrap bench``'s end-to-end runs (``python -m ppwrap.bench.rank``).

``ppwrap.bench.pipeline`` starts it on every local rank with ``run_local``. Each rank
loads every variant's shard of the same checkpoint, as its users would:

- ``stock``: what ``mlx_lm.utils.sharded_load`` does once the files are local
  (``load_model(lazy=True)``, ``model.model.pipeline(group)``, evaluate, barrier),
  then mlx-lm's ``stream_generate`` on every rank;
- ``ppwrap-head`` and ``ppwrap``: ``ppwrap.load`` with ``elide_output_head``
  false and true, then ``ppwrap.stream_generate``.

Then all ranks run, in lockstep, one short warm-up generation per variant and
``repeats`` rounds of one generation per variant, the order reversed every
other round. End-of-sequence tokens are switched off so that every generation
decodes exactly ``--tokens`` tokens, and after every generation the ranks
wait until nothing is in flight (:func:`settle`). Each rank writes
``rank<r>.json`` to ``--out``: per variant the samples it timed, its resident
parameter bytes and the tokens it saw.

With ``--delays`` (ranks behind ``run_local``'s delaying relay) every round
runs every variant at each of those link delays, the order reversed every
other round: rank 0 sets the relay's delay while all ranks are idle, and each
variant warms up at the new delay before it is timed (ranks that pace
themselves learn the link's rhythm from their last steps). Each sample then
says its ``delay_ms``, and its ``mbps`` where the link's bandwidth was
limited too (``DELAY@MBPS``). The time a link adds is a difference of
samples from one launch, with the processes, their placement and the host's
load alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from .._relay import CONTROL_ENV, set_delay
from .pipeline import VARIANTS, bench_prompt

Generate = Callable[[list[int], int], Iterator[Any]]


def _param_bytes(model: Any) -> int:
    from ppwrap._pipeline import nbytes

    return nbytes(model)


def load_variant(variant: str, path: Path, group: Any) -> tuple[Generate, int, int]:
    """Load ``variant`` on this rank.

    Returns:
        A function ``(prompt ids, tokens) -> responses``, the vocabulary size
        and the resident parameter bytes.
    """
    if variant == "stock":
        from mlx_lm.generate import stream_generate
        from mlx_lm.utils import load_model, load_tokenizer

        model, config = load_model(path, lazy=True, strict=False)
        model.model.pipeline(group)
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
        tokenizer.eos_token_ids = set()

        def generate(prompt: list[int], tokens: int) -> Iterator[Any]:
            return stream_generate(model, tokenizer, mx.array(prompt), max_tokens=tokens)  # type: ignore[no-any-return]

        return generate, int(config["vocab_size"]), _param_bytes(model)

    from .._generate import stream_generate as pp_stream_generate
    from .._load import load

    head, pp_tokenizer = load(path, group=group, elide_output_head=variant == "ppwrap")
    pp_tokenizer.eos_token_ids = set()

    def pp_generate(prompt: list[int], tokens: int) -> Iterator[Any]:
        return pp_stream_generate(head, pp_tokenizer, mx.array(prompt), max_tokens=tokens)

    return pp_generate, int(head.vocab_size or 1000), head.resident_bytes()


def timed(generate: Generate, prompt: list[int], tokens: int) -> dict[str, Any]:
    """One generation, timed the same way for every variant.

    Prefill time runs from the call to the first token (the prompt and the
    first decode step, as mlx-lm's ``prompt_tps``); decode time from the first
    token to the last, over ``tokens - 1`` steps.
    """
    ids: list[int] = []
    tic = time.perf_counter()
    first = last = tic
    for response in generate(prompt, tokens):
        last = time.perf_counter()
        if not ids:
            first = last
        ids.append(int(response.token))
    if len(ids) != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {len(ids)}")
    return {
        "prefill_tps": len(prompt) / (first - tic),
        "decode_tps": (tokens - 1) / (last - first),
        "seconds": last - tic,
        "tokens": ids,
    }


def settle(group: Any) -> None:
    """Wait, on every rank, until no work of the last generation is left in flight.

    When mlx-lm's ``stream_generate`` stops, its ``generate_step`` has already
    queued the step after the last token. Left running, that step's
    collectives would overlap the next variant's, on another stream over the
    same connections, and mix their messages (wrong tokens, or a hang).
    """
    from mlx_lm.generate import generation_stream as mlx_lm_stream

    from .._generate import generation_stream as ppwrap_stream

    for stream in (mlx_lm_stream, ppwrap_stream):
        mx.synchronize(stream)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))


def _link(entry: str) -> tuple[float, float | None]:
    """``"5"`` -> (5.0, None); ``"5@100"`` -> (5.0, 100.0): ms, megabits per second."""
    delay, _, mbps = entry.partition("@")
    return float(delay), float(mbps) if mbps else None


def _device() -> str:
    """The device every variant's generation stream computes on ("cpu" or "gpu")."""
    from mlx_lm.generate import generation_stream as mlx_lm_stream

    from .._generate import generation_stream as ppwrap_stream

    devices = {s.device.type.name for s in (mlx_lm_stream, ppwrap_stream)}
    if len(devices) != 1:
        raise RuntimeError(f"mlx-lm and ppwrap generate on different devices: {devices}")
    return devices.pop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run this rank's share of one end-to-end benchmark."""
    parser = argparse.ArgumentParser(prog="python -m ppwrap.bench.rank")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument(
        "--delays",
        help="links to alternate in one launch, comma-separated: a delay in ms, or "
        "DELAY@MBPS for a bandwidth limit too (megabits per second each way)",
    )
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    delays: list[tuple[float, float | None] | None] = [None]
    if args.delays:
        delays = [_link(entry) for entry in args.delays.split(",")]
        if CONTROL_ENV not in os.environ:
            parser.error(f"--delays needs ranks behind a delaying relay ({CONTROL_ENV} is unset)")

    group = mx.distributed.init()
    loaded = {v: load_variant(v, args.model, group) for v in variants}
    vocab = min(size for _, size, _ in loaded.values())
    prompt = bench_prompt(vocab, args.prompt_tokens)
    for v in variants:
        timed(loaded[v][0], prompt, min(4, args.tokens))  # warm-up: compile, allocate
        settle(group)
    samples: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        order = variants if rep % 2 == 0 else list(reversed(variants))
        for link in delays if rep % 2 == 0 else list(reversed(delays)):
            delay, mbps = link if link is not None else (None, None)
            if delay is not None:
                if group.rank() == 0:
                    rate = None if mbps is None else mbps * 1e6 / 8
                    set_delay(os.environ[CONTROL_ENV], delay / 1000, rate)
                settle(group)  # no rank starts before the relay holds the new delay
                for v in order:
                    timed(loaded[v][0], prompt, min(4, args.tokens))
                    settle(group)
            for v in order:
                sample = {**timed(loaded[v][0], prompt, args.tokens), "delay_ms": delay}
                samples[v].append(sample if mbps is None else {**sample, "mbps": mbps})
                settle(group)
    result = {
        "rank": group.rank(),
        "size": group.size(),
        "device": _device(),
        "variants": {
            v: {
                "samples": [{k: s[k] for k in s if k != "tokens"} for s in samples[v]],
                "tokens": samples[v][-1]["tokens"],
                "resident_bytes": loaded[v][2],
            }
            for v in variants
        },
    }
    path = args.out / f"rank{group.rank()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
