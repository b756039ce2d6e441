"""What a stage message carries besides the hidden state.

Most families hand the next layer one hidden state. Some hand it more: rwkv7's
layers pass on the first layer's value stream, hunyuan's the keys and values a
cross-layer-attention group shares. Their adapters name the arguments of the
next layer's call that a layer's other outputs feed (``Adapter.carries``);
at a stage boundary those outputs travel in the same message as the hidden
state, packed as bytes, so a boundary is still one send and one receive.

A carried value is ``None``, an array or a tuple of arrays; its *form* says
which, with each array's :class:`~ppwrap._pipeline.Wire`. Every array of a
message shares the hidden state's leading ``(batch, length)`` axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

__all__ = [
    "Form",
    "arg",
    "decode",
    "encode",
    "form_of",
    "leaves",
    "pack",
    "packed_zeros",
    "part_of",
    "placeholders",
    "rebuild",
    "replace_arg",
    "split_output",
    "unpack",
    "wires",
]

# One carried value's form: None, a Wire (one array) or a tuple of Wires.
Form = Any


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], slot: int | str) -> Any:
    """The value of argument ``slot`` (a position or a keyword) in a call, or None."""
    if isinstance(slot, int):
        return args[slot] if len(args) > slot else None
    return kwargs.get(slot)


def replace_arg(
    args: tuple[Any, ...], kwargs: dict[str, Any], slot: int | str, value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(slot, int):
        return (*args[:slot], value, *args[slot + 1 :]), kwargs
    return args, {**kwargs, slot: value}


def form_of(values: Sequence[Any], wire: Any) -> tuple[Form, ...]:
    """The forms of carried ``values``; ``wire`` is the Wire class (no cycle)."""

    def one(value: Any) -> Form:
        if value is None:
            return None
        if isinstance(value, mx.array):
            return wire.of(value)
        if isinstance(value, (tuple, list)) and all(isinstance(v, mx.array) for v in value):
            return tuple(wire.of(v) for v in value)
        raise TypeError(
            f"a layer hands the next one a {type(value).__name__}; a stage boundary "
            "can carry None, an array or a tuple of arrays."
        )

    return tuple(one(v) for v in values)


def split_output(out: Any, count: int, codec: Any) -> tuple[Any, tuple[Any, ...]]:
    """A layer's output as (hidden state, carried values as they cross).

    A tuple holds the hidden state, then ``count`` values the next layer takes
    (through the adapter's ``carry_codec``), then what stays on this rank (a
    shared-KV family's keys and values); anything else is the hidden state.
    """
    if not isinstance(out, tuple):
        return out, ()
    carried = out[1 : count + 1]
    if codec is not None:
        carried = tuple(codec[0](v) for v in carried)
    return out[0], carried


def leaves(values: Sequence[Any]) -> list[mx.array]:
    """The arrays of carried ``values``, in order."""
    out: list[mx.array] = []
    for value in values:
        if isinstance(value, mx.array):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            out.extend(value)
    return out


def wires(forms: Sequence[Form]) -> list[Any]:
    out: list[Any] = []
    for form in forms:
        if isinstance(form, tuple):
            out.extend(form)
        elif form is not None:
            out.append(form)
    return out


def rebuild(forms: Sequence[Form], arrays: Sequence[mx.array]) -> tuple[Any, ...]:
    """Carried values of ``forms`` from their arrays, in order."""
    it = iter(arrays)
    out: list[Any] = []
    for form in forms:
        if form is None:
            out.append(None)
        elif isinstance(form, tuple):
            out.append(tuple(next(it) for _ in form))
        else:
            out.append(next(it))
    return tuple(out)


def placeholders(forms: Sequence[Form], lead: Sequence[int]) -> tuple[Any, ...]:
    """Zeros in ``forms`` (never evaluated): what a layer another rank owns
    hands on, so that a receiving layer can tell them from a ``None`` its
    backbone passes (hunyuan starts each sharing group with ``None``)."""
    return rebuild(forms, [w.zeros(lead) for w in wires(forms)])


# Each part of a message starts at a multiple of this many bytes: a view at an
# offset that is not a multiple of its item size would read the wrong bytes.
ALIGN = 8

# One part of a message: its full shape and its dtype.
Part = tuple[tuple[int, ...], mx.Dtype]


def part_of(wire: Any, lead: Sequence[int]) -> Part:
    """The part an array of ``wire`` with leading axes ``lead`` makes."""
    return (*lead, *wire.tail), getattr(mx, wire.dtype)


def _nbytes(part: Part) -> int:
    shape, dtype = part
    size = int(math.prod(shape)) * dtype.size
    return -(-size // ALIGN) * ALIGN


def pack(arrays: Sequence[mx.array]) -> mx.array:
    """One flat uint8 message holding ``arrays``, each padded to ``ALIGN`` bytes."""
    flat = []
    for a in arrays:
        data = mx.view(mx.contiguous(a), mx.uint8).reshape(-1)
        pad = _nbytes((a.shape, a.dtype)) - data.size
        flat.append(mx.pad(data, (0, pad)) if pad else data)
    return mx.concatenate(flat)


def packed_zeros(parts: Sequence[Part]) -> mx.array:
    """A template of the message :func:`pack` makes of arrays of ``parts``."""
    return mx.zeros((sum(_nbytes(p) for p in parts),), dtype=mx.uint8)


def unpack(message: mx.array, parts: Sequence[Part]) -> list[mx.array]:
    """The arrays of a message from :func:`pack`, in the shapes of ``parts``."""
    out, start = [], 0
    for shape, dtype in parts:
        size = int(math.prod(shape)) * dtype.size
        out.append(mx.view(message[start : start + size], dtype).reshape(shape))
        start += _nbytes((shape, dtype))
    return out


def encode(forms: Sequence[Form] | None) -> Any:
    """``forms`` as plain lists, for the handshake's JSON."""
    if forms is None:
        return None

    def one(form: Form) -> Any:
        if form is None:
            return None
        if isinstance(form, tuple):
            return {"tuple": [[list(w.tail), w.dtype] for w in form]}
        return [list(form.tail), form.dtype]

    return [one(f) for f in forms]


def decode(value: Any, wire: Any) -> tuple[Form, ...] | None:
    if value is None:
        return None

    def one(item: Any) -> Form:
        if item is None:
            return None
        if isinstance(item, dict):
            return tuple(wire(tuple(t), d) for t, d in item["tuple"])
        return wire(tuple(item[0]), item[1])

    return tuple(one(v) for v in value)
