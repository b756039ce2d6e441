"""What crosses each stage boundary, found before any weight is dropped.

Each rank runs layers lazily on one token (nothing is computed) and notes the
hidden state's shape and dtype, and what else the layers hand on, where its
stage begins and ends; the handshake gathers the records and :func:`link`
walks them from the first stage to the final one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn

from . import _carry as carry
from ._adapter import Parts
from ._errors import StageMismatchError, UnsplittableModelError
from ._roles import (
    Skipped,
    added_to,
    cache_arg,
    encode_hidden,
    hidden_of,
    lead_of,
    mix,
    replace_hidden,
    take_carried,
)
from ._stage import Wire, kv_to_wire

__all__ = ["Links", "link", "local_wires", "probe", "probe_closure", "probe_kv", "stage_record"]


# The dtypes a hidden state may cross a stage boundary in.
WIRE_DTYPES = ("float16", "bfloat16", "float32")


class _Probed(Exception):
    """Ends a probe run of the backbone at the last layer it looks at."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out


class _Probe:
    """Mixed into the first and last layer of a probe run (see :func:`probe`)."""

    _pp_hidden: int
    _pp_probe_dtype: str | None = None
    _pp_probe_arriving: tuple[carry.Form, ...] | None = None
    _pp_probe_first = False
    _pp_probe_last = False
    _pp_probe_seen: Wire

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._pp_probe_first:
            x, key = hidden_of(args, kwargs, self._pp_hidden)
            if self._pp_probe_dtype is not None:
                x = mx.zeros(x.shape, getattr(mx, self._pp_probe_dtype))
                args, kwargs = replace_hidden(args, kwargs, self._pp_hidden, key, x)
            if self._pp_probe_arriving is not None:
                held = carry.placeholders(self._pp_probe_arriving, lead_of(self, x))
                args, kwargs = take_carried(self, args, kwargs, held)
            self._pp_probe_seen = Wire.of(encode_hidden(self, x))
        out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if self._pp_probe_last:
            raise _Probed(out)
        return out


def probe(
    parts: Parts,
    layers: list[Any],
    lo: int,
    hi: int,
    dtype: str | None = None,
    arriving: tuple[carry.Form, ...] | None = None,
    kv_wires: dict[int, tuple[Wire, Wire]] | None = None,
) -> tuple[Wire, Wire, tuple[carry.Form, ...] | None]:
    """What enters ``layers[lo]`` and what leaves ``layers[hi - 1]``, for one token:
    the hidden states' wires and the forms of what the last layer carries on
    (``None`` for a family that carries nothing).

    Runs the backbone lazily (nothing is computed, unless a family evaluates
    inside its forward pass) with the layers before ``lo`` passing the hidden
    state through and the run cut short after ``layers[hi - 1]``. With
    ``dtype``, ``layers[lo]`` gets zeros of that dtype instead of what came
    before, as a stage that receives its input would; with ``arriving``, the
    layers before it hand on zeros of those forms as carried values; with
    ``kv_wires``, the shared-KV sources before it hand on zeros of those.
    """
    classes = [type(layer) for layer in layers[:hi]]
    ends = {id(layers[lo]): layers[lo], id(layers[hi - 1]): layers[hi - 1]}
    try:
        for layer in layers[:lo]:
            mix(layer, Skipped)
            if arriving is not None:
                object.__setattr__(layer, "_pp_placeholder", arriving)
        for i, wires in (kv_wires or {}).items():
            if i < lo:
                object.__setattr__(layers[i], "_pp_fake_kv", wires)
        for layer in ends.values():
            mix(layer, _Probe)
        layers[lo]._pp_probe_dtype = dtype
        if arriving is not None:
            object.__setattr__(layers[lo], "_pp_probe_arriving", arriving)
        layers[hi - 1]._pp_probe_last = True
        layers[lo]._pp_probe_first = True
        try:
            parts.run_backbone(mx.zeros((1, 1), dtype=mx.int32))
        except _Probed as done:
            out = done.out
        else:
            raise RuntimeError("the probe run never reached its last layer")
        seen = layers[lo]._pp_probe_seen
    finally:
        for layer, cls in zip(layers[:hi], classes, strict=True):
            layer.__class__ = cls
        for layer in ends.values():
            for name in (
                "_pp_probe_dtype",
                "_pp_probe_last",
                "_pp_probe_first",
                "_pp_probe_seen",
                "_pp_probe_arriving",
            ):
                layer.__dict__.pop(name, None)
        for layer in layers[:lo]:
            layer.__dict__.pop("_pp_placeholder", None)
            layer.__dict__.pop("_pp_fake_kv", None)
    carries = parts.adapter.carries
    forms = None
    if isinstance(out, tuple) and len(out) >= len(carries) + 1:
        out, carried = carry.split_output(out, len(carries), parts.adapter.carry_codec)
        if carries:
            forms = carry.form_of(carried, Wire)
    if not isinstance(out, mx.array):
        raise TypeError(
            f"layer {hi - 1} of model type {parts.adapter.model_type!r} returned "
            f"{type(out).__name__}, not an array; a layer that returns more needs an "
            "adapter that says what it carries (Adapter.carries)."
        )
    return seen, Wire.of(encode_hidden(layers[hi - 1], out)), forms


class _Reentry:
    """Mixed into the first layer for :func:`probe_closure`."""

    _pp_hidden: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_pp_seen"):
            raise _Probed(Wire.of(hidden_of(args, kwargs, self._pp_hidden)[0]))
        self.__dict__["_pp_seen"] = True
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


def probe_closure(parts: Parts, layers: list[Any]) -> Wire:
    """What the first layer takes on its second run, in a looped stack.

    The unsplit model's lazy run, which every rank can make alone: a split
    model hands each stage what the unsplit one computes there.
    """
    first = layers[0]
    cls = type(first)
    mix(first, _Reentry)
    try:
        parts.run_backbone(mx.zeros((1, 1), dtype=mx.int32))
    except _Probed as done:
        return cast("Wire", done.out)
    finally:
        first.__class__ = cls
        first.__dict__.pop("_pp_seen", None)
    raise UnsplittableModelError(
        f"model type {parts.adapter.model_type!r}: its adapter says the backbone runs "
        "its layers several times, but it ran the first layer once."
    )


class _KVProbe:
    """Mixed into each shared-KV source for :func:`probe_kv`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with added_to(cache_arg(args, kwargs)) as seen:
            out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        k, v = seen[-1]
        self.__dict__["_pp_kv_seen"] = (Wire.of(kv_to_wire(k)), Wire.of(kv_to_wire(v)))
        return out


def probe_kv(
    parts: Parts, model: nn.Module, layers: list[Any], sources: Sequence[int]
) -> dict[int, tuple[Wire, Wire]]:
    """Each shared-KV source's new keys and values per token, as a stage
    message carries them: the unsplit model's lazy run with a cache, which
    every rank can make alone."""
    from mlx_lm.models.cache import make_prompt_cache

    classes = {s: type(layers[s]) for s in sources}
    for s in sources:
        mix(layers[s], _KVProbe)
    try:
        parts.run_backbone(mx.zeros((1, 1), dtype=mx.int32), cache=make_prompt_cache(model))
        return {s: layers[s].__dict__["_pp_kv_seen"] for s in sources}
    except (KeyError, IndexError) as e:
        raise UnsplittableModelError(
            f"model type {parts.adapter.model_type!r}: a shared-KV source layer added "
            "no keys and values to its cache in a run of one token."
        ) from e
    finally:
        for s, cls in classes.items():
            layers[s].__class__ = cls
            layers[s].__dict__.pop("_pp_kv_seen", None)


def stage_record(
    parts: Parts,
    layers: list[Any],
    start: int,
    end: int,
    *,
    first: bool,
    kv_wires: dict[int, tuple[Wire, Wire]] | None = None,
) -> dict[str, Any]:
    """What this rank tells the others at the handshake about its stage.

    The first stage: what it sends. Every other stage: the width it takes in
    and, for each dtype it may receive in, what it then produces. Which of
    those applies is only known once every rank has said what it does.
    """
    if first:
        _, out, forms = probe(parts, layers, 0, end, kv_wires=kv_wires)
        return {"out": attrs.astuple(out), "carry": carry.encode(forms)}
    # What a family's layers carry into this stage, as the layers before it
    # would make it here (their stage checks the forms when it sends).
    arriving = (
        probe(parts, layers, 0, start, kv_wires=kv_wires)[2] if parts.adapter.carries else None
    )
    table = {}
    width: Wire | None = None
    for dtype in WIRE_DTYPES:
        try:
            seen, out, forms = probe(parts, layers, start, end, dtype, arriving, kv_wires)
        except (ValueError, TypeError):
            continue  # a dtype this stage cannot take
        width = seen
        table[dtype] = [*attrs.astuple(out), carry.encode(forms)]
    if width is None:
        raise UnsplittableModelError(
            f"model type {parts.adapter.model_type!r}: layers {start}-{end - 1} take none of "
            f"{list(WIRE_DTYPES)} as their input."
        )
    return {"in": list(width.tail), "table": table}


def _wire(value: Any) -> Wire:
    tail, dtype = value[:2]
    return Wire(tuple(tail), dtype)


@attrs.frozen
class Links:
    """What one rank receives and sends: hidden states' wires and carried forms."""

    receives: Wire | None = None
    sends: Wire | None = None
    carry_in: tuple[carry.Form, ...] | None = None
    carry_out: tuple[carry.Form, ...] | None = None


def link(records: list[dict[str, Any]]) -> list[Links]:
    """What each rank receives and sends, from every rank's :func:`stage_record`.

    Walks from the first stage (the last rank) to the final one: each stage
    receives what the one before it really produces.

    Raises:
        StageMismatchError: A stage produces what the next one cannot take.
    """
    size = len(records)
    links = [Links()] * size
    sent = _wire(records[size - 1]["out"])
    forms = carry.decode(records[size - 1].get("carry"), Wire)
    links[size - 1] = Links(sends=sent, carry_out=forms)
    for r in range(size - 2, -1, -1):
        takes = records[r]["table"]
        width = tuple(records[r]["in"])
        if sent.tail != width or sent.dtype not in takes:
            raise StageMismatchError(
                f"rank {r + 1} sends its hidden state as {sent.describe()}, but rank {r} "
                f"takes (batch, length, {', '.join(map(str, width))}) in "
                f"{' or '.join(takes) or 'no dtype'}. The ranks split different models "
                "(another checkpoint, dtype or adapter)."
            )
        entry = takes[sent.dtype]
        received, sent = sent, _wire(entry)
        received_forms = forms
        forms = carry.decode(entry[2], Wire) if len(entry) > 2 else None
        links[r] = Links(
            receives=received,
            sends=None if r == 0 else sent,
            carry_in=received_forms,
            carry_out=None if r == 0 else forms,
        )
    return links


def local_wires(
    parts: Parts,
    layers: list[Any],
    start: int,
    end: int,
    *,
    rank: int,
    size: int,
    kv_wires: dict[int, tuple[Wire, Wire]] | None = None,
) -> Links:
    """What this rank receives and sends, worked out alone (no handshake).

    Runs the layers before this stage here too, lazily.
    """
    receives = carry_in = None
    if rank < size - 1:
        _, receives, carry_in = probe(parts, layers, 0, start, kv_wires=kv_wires)
    if rank == 0:
        return Links(receives=receives, carry_in=carry_in)
    lo, dtype = (start, receives.dtype) if receives is not None else (0, None)
    _, sends, carry_out = probe(parts, layers, lo, end, dtype, carry_in, kv_wires)
    return Links(receives=receives, sends=sends, carry_in=carry_in, carry_out=carry_out)
