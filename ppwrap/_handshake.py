"""The rank handshake: every rank checks that all ranks run the same pipeline.

Ranks that disagree (another checkpoint, another split, another ppwrap) would
otherwise hang in their first collective or compute garbage. Each rank sends a
small fingerprint to all others; any difference raises the same error on every
rank, naming the ranks and fields. In the same message each rank says what its
stage takes in and sends out, so that every receive is made for what the
previous stage really sends (see ``_pipeline.link``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ._adapter import Parts
from ._errors import HandshakeError
from ._version import __version__
from ._watchdog import Watchdog

__all__ = ["HandshakeError", "fingerprint", "handshake"]

FINGERPRINT_BYTES = 4096


def _config_of(model: nn.Module) -> Any:
    args = getattr(model, "args", None) or getattr(model, "config", None)
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        return dataclasses.asdict(args)
    return args if isinstance(args, dict) else repr(args)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _adapter_id(adapter: Any) -> str:
    # Names, not reprs: a function's repr holds its address, which differs per process.
    def name(value: Any) -> str:
        if callable(value):
            return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
        if isinstance(value, tuple):
            return repr([name(v) for v in value])
        if attrs.has(type(value)):
            return repr({f.name: name(getattr(value, f.name)) for f in attrs.fields(type(value))})
        return repr(value)

    return _digest({f.name: name(getattr(adapter, f.name)) for f in attrs.fields(type(adapter))})


def _weights(layers: list[Any]) -> tuple[str, str]:
    """The floating dtypes and the quantizations of every layer's weights.

    Every layer, not only this rank's: checkpoints mix dtypes (float32 norms
    beside float16 weights), and hybrid stacks put other layer kinds, with
    other dtypes, on other ranks. The handshake runs before any rank drops a
    weight, and lazy arrays know their dtype unread.
    """
    dtypes: set[str] = set()
    quants: set[str] = set()
    for layer in layers:
        for module in layer.modules():
            bits = getattr(module, "bits", None)
            if isinstance(bits, int):
                quants.add(f"{bits}-bit, group {getattr(module, 'group_size', '?')}")
        for _, w in cast("list[tuple[str, mx.array]]", tree_flatten(layer.parameters())):
            if w.size and mx.issubdtype(w.dtype, mx.floating):
                dtypes.add(str(w.dtype).removeprefix("mlx.core."))
    return "+".join(sorted(dtypes)) or "none", "; ".join(sorted(quants)) or "none"


def fingerprint(
    model: nn.Module, parts: Parts, split: tuple[int, ...], layers: list[Any]
) -> dict[str, str]:
    """What every rank of one pipeline must agree on."""
    from importlib.metadata import version

    dtype, quant = _weights(layers)
    args = _config_of(model)
    vocab = args.get("vocab_size", "?") if isinstance(args, dict) else "?"
    return {
        "family": parts.adapter.model_type,
        "layers": str(len(layers)),
        "split": str(list(split)),
        "vocab_size": str(vocab),
        "dtype": dtype,
        "quantization": quant,
        "config": _digest(args),
        "adapter": _adapter_id(parts.adapter),
        "ppwrap": __version__,
        "mlx_lm": version("mlx-lm"),
        "mlx": version("mlx"),
    }


def _encode(fp: dict[str, Any]) -> mx.array:
    data = json.dumps(fp, sort_keys=True).encode()
    if len(data) > FINGERPRINT_BYTES:
        raise ValueError(f"fingerprint too long ({len(data)} bytes)")
    padded = data + b" " * (FINGERPRINT_BYTES - len(data))
    return mx.array(np.frombuffer(padded, dtype=np.uint8))


def handshake(
    fp: dict[str, str],
    group: mx.distributed.Group,
    *,
    timeout: float | None = 120.0,
    stage: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Exchange fingerprints with every rank and raise if any differs.

    Args:
        fp: This rank's fingerprint.
        group: The pipeline's group.
        timeout: Seconds to wait for every rank to arrive; after that this rank
            names the ranks it waited for and exits (:class:`ppwrap.Watchdog`).
            ``None`` waits forever.
        stage: This rank's stage record, sent along but not compared.

    Returns:
        Every rank's stage record, indexed by rank.

    Raises:
        HandshakeError: The fingerprints differ; the same message on every rank.
    """
    size, rank = group.size(), group.rank()
    if size == 1:
        return [stage or {}]
    message = {"fingerprint": fp, "stage": stage or {}}
    gathered = mx.distributed.all_gather(_encode(message), group=group, stream=mx.cpu)
    others = [r for r in range(size) if r != rank]
    if timeout is None:
        mx.eval(gathered)
    else:
        with Watchdog(timeout, rank=rank).watch(
            f"the handshake (waiting for rank{'s' if len(others) > 1 else ''} "
            f"{', '.join(map(str, others))} to arrive)"
        ):
            mx.eval(gathered)
    rows = np.array(gathered).reshape(size, FINGERPRINT_BYTES)
    messages = [json.loads(bytes(row).decode().rstrip()) for row in rows]
    fps = [m["fingerprint"] for m in messages]
    fields = sorted({k for f in fps for k in f if any(g.get(k) != fps[0].get(k) for g in fps)})
    if not fields:
        return [m["stage"] for m in messages]
    per_rank = "; ".join(
        f"rank {r}: " + ", ".join(f"{k}={f.get(k)}" for k in fields) for r, f in enumerate(fps)
    )
    raise HandshakeError(
        f"ppwrap: the {size} ranks disagree on {', '.join(fields)} ({per_rank}). Every "
        "rank must load the same checkpoint with the same split, adapter, ppwrap and "
        "mlx-lm versions."
    )
