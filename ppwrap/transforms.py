"""Logit transforms that many families apply after the head, for adapters.

Each takes the dotted path (from the text model) of the config value it uses
and returns an ``Adapter.transform``. A value that is ``None`` or 0 turns the
transform off, as the families themselves do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

__all__ = ["chain", "divide", "multiply", "softcap"]

Transform = Callable[[nn.Module, mx.array], mx.array]


def _value(model: nn.Module, path: str) -> Any:
    value: Any = model
    for name in path.split("."):
        value = getattr(value, name)
    return value


def softcap(path: str) -> Transform:
    """``tanh(logits / cap) * cap``, with the cap read from ``path``."""

    def transform(model: nn.Module, logits: mx.array) -> mx.array:
        cap: float | None = _value(model, path)
        if not cap:
            return logits
        return mx.tanh(logits / cap) * cap

    return transform


def multiply(path: str) -> Transform:
    """``logits * value``, with the value read from ``path``."""

    def transform(model: nn.Module, logits: mx.array) -> mx.array:
        value: float = _value(model, path)
        return logits * value

    return transform


def divide(path: str) -> Transform:
    """``logits / value``, with the value read from ``path``."""

    def transform(model: nn.Module, logits: mx.array) -> mx.array:
        value: float = _value(model, path)
        return logits / value

    return transform


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order."""

    def transform(model: nn.Module, logits: mx.array) -> mx.array:
        for t in transforms:
            logits = t(model, logits)
        return logits

    return transform
