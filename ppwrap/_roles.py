"""The classes :func:`ppwrap.pipeline` mixes into a backbone's layers.

The backbone's own ``__call__`` keeps running unchanged; only its layers change
class. A layer another rank owns passes the hidden state through
(:class:`Skipped`), its caches advanced as if it ran; the first and last local
layers receive from and send to the neighbouring stages (:class:`StageEnd`);
a few more roles serve families whose layers share keys and values or run in
loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from . import _carry as carry
from ._errors import StageMismatchError
from ._stage import Stage, Wire, recv_message, send_message, zero_kv

__all__ = [
    "Backbone",
    "KVMirror",
    "KVSource",
    "LoopBack",
    "ShapeOnly",
    "Skipped",
    "StageEnd",
    "added_to",
    "cache_arg",
    "decode_hidden",
    "encode_hidden",
    "hidden_of",
    "lead_of",
    "mix",
    "replace_hidden",
    "stage_alone",
    "take_carried",
]


def _advance(cache: Any, length: int, batch: int) -> None:
    """Advance a cache this rank does not fill, as if ``length`` tokens went in."""
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache

    if type(cache) is KVCache and cache.keys is not None:
        keys = cache.keys
        if isinstance(keys, mx.array) and keys.size == 0 and cache.offset + length <= keys.shape[2]:
            # A plain KV cache with room left: its update would only move the
            # offset (the zero-width keys hold nothing), so skip the array ops:
            # every skipped layer pays them on every decoded token.
            cache.offset += length
            return
    if isinstance(cache, (CacheList, list, tuple)):
        for c in cache.caches if isinstance(cache, CacheList) else cache:
            _advance(c, length, batch)
    elif isinstance(cache, ArraysCache) or cache is None:
        return  # recurrent state: nothing positional to keep in step
    elif hasattr(cache, "update_and_fetch"):
        # Zero-width keys: offsets and rotation move exactly as on a real layer.
        empty = mx.zeros((batch, 1, length, 0))
        cache.update_and_fetch(empty, empty)
        # Nothing evaluates these arrays, so each update would hang on to the
        # last: a graph growing by a node per token. Fresh leaves end the chain.
        for name in ("keys", "values"):
            value = getattr(cache, name, None)
            if isinstance(value, mx.array) and value.size == 0:
                setattr(cache, name, mx.zeros(value.shape, value.dtype))
    elif hasattr(cache, "offset"):
        cache.offset += length


def _chain(cache: Any, sent: mx.array) -> bool:
    """Make the cache's state depend on the send, so evaluating the cache sends.

    Loops that evaluate only the cache after a prefill chunk (mlx-lm's
    ``generate_step`` does) would otherwise never run this rank's send.

    Returns:
        Whether the cache now depends on ``sent`` (an entry not written yet,
        or one without arrays, cannot).
    """
    from mlx_lm.models.cache import ArraysCache, CacheList

    if isinstance(cache, (CacheList, list, tuple)):
        entries = cache.caches if isinstance(cache, CacheList) else cache
        return any([_chain(c, sent) for c in entries])
    if cache is None:
        return False
    if isinstance(cache, ArraysCache):
        if cache[0] is None:
            return False
        cache[0] = mx.depends(cache[0], sent)
        return True
    if isinstance(keys := getattr(cache, "keys", None), mx.array):
        cache.keys = mx.depends(keys, sent)
        return True
    if isinstance(keys, tuple) and keys and isinstance(keys[0], mx.array):
        cache.keys = (mx.depends(keys[0], sent), *keys[1:])  # quantized: (data, scales, ...)
        return True
    # A family's own cache (deepseek_v41's LayerCache): an array attribute
    # that its state hands out as it is.
    held = {id(a) for a in getattr(cache, "state", ()) if isinstance(a, mx.array)}
    for name, value in vars(cache).items():
        if isinstance(value, mx.array) and id(value) in held:
            setattr(cache, name, mx.depends(value, sent))
            return True
    return False


def chain_into(cache: Sequence[Any], sent: mx.array) -> None:
    """Make a prompt cache's state depend on ``sent``, through its first entry
    that can (see :func:`_chain`).

    The first such entry, not the sending layer's own: that one may hold
    nothing to chain to (an MLP-only block, a layer that reads another
    layer's keys and values), and a loop that evaluates the cache evaluates
    every entry.
    """
    for entry in cache:
        if _chain(entry, sent):
            return


def _is_cache(value: Any) -> bool:
    from mlx_lm.models.cache import _BaseCache

    if isinstance(value, (list, tuple)):
        return any(_is_cache(v) for v in value)
    # A family's own cache class keeps an offset and a state, as mlx-lm's do.
    return isinstance(value, _BaseCache) or (hasattr(value, "offset") and hasattr(value, "state"))


HIDDEN_KEYWORDS = ("x", "h", "hidden_states", "inputs", "hidden")


def hidden_of(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int
) -> tuple[mx.array, str | None]:
    """The hidden state a layer was called with, and its keyword (if not positional)."""
    if len(args) > index:
        return args[index], None
    for key in HIDDEN_KEYWORDS:
        if isinstance(kwargs.get(key), mx.array):
            return kwargs[key], key
    raise TypeError(
        f"cannot tell which argument of the layer call is the hidden state "
        f"(keywords {sorted(kwargs)}); name the layer's hidden-state argument one of "
        f"{list(HIDDEN_KEYWORDS)} or pass it first."
    )


def replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, key: str | None, x: mx.array
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if key is None:
        return (*args[:index], x, *args[index + 1 :]), kwargs
    return args, {**kwargs, key: x}


def encode_hidden(layer: Any, x: mx.array) -> mx.array:
    """A layer's hidden state as it crosses a boundary: ``(batch, length, ...)``,
    through the adapter's ``hidden_codec`` where it has one."""
    codec = getattr(layer, "_pp_hidden_codec", None)
    return x if codec is None else cast("mx.array", codec[0](x))


def decode_hidden(layer: Any, x: mx.array, local: mx.array) -> mx.array:
    codec = getattr(layer, "_pp_hidden_codec", None)
    return x if codec is None else cast("mx.array", codec[1](x, local))


def lead_of(layer: Any, x: mx.array) -> tuple[int, ...]:
    """The (batch, length) axes of a layer's hidden state as it crosses a boundary."""
    return tuple(encode_hidden(layer, x).shape[:2])


def cache_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for value in (*args, *kwargs.values()):
        if _is_cache(value):
            return value
    return None


def take_carried(
    layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], received: tuple[Any, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A receiving layer's call arguments with the carried values it received."""
    for slot, value in zip(layer._pp_carries, received, strict=False):
        local = carry.arg(args, kwargs, slot)
        # A None here is the backbone's own (a new sharing group): keep it.
        if local is not None:
            if layer._pp_codec is not None:
                value = layer._pp_codec[1](value, local)
            args, kwargs = carry.replace_arg(args, kwargs, slot, value)
    return args, kwargs


_subclasses: dict[tuple[type, type], type] = {}


def mix(obj: nn.Module, role: type) -> None:
    cls = type(obj)
    key = (role, cls)
    if key not in _subclasses:
        _subclasses[key] = type(f"{role.__name__.lstrip('_')}{cls.__name__}", (role, cls), {})
    obj.__class__ = _subclasses[key]


class Skipped:
    """Mixed into a layer another rank owns: the hidden state passes through.

    So do the values it would hand the next layer (``Adapter.carries``); where
    it got ``None`` and the stage receives a carried value, it hands on
    zeros of that value's form (``_pp_placeholder``), never evaluated.
    """

    _pp_hidden: int
    _pp_carries: tuple[int | str, ...] = ()
    _pp_codec: Any = None
    _pp_placeholder: tuple[carry.Form, ...] | None = None
    # False for a layer reading another layer's keys and values: the cache it
    # is handed is its source's, which that layer (or its copy) advances.
    _pp_advance: bool = True
    _pp_own_advance: Any = None  # Adapter.advance
    _pp_returns: Any = None  # SharedKV.returns
    _pp_fake_kv: tuple[Wire, Wire] | None = None  # a probe's stand-in for a copy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        x, _ = hidden_of(args, kwargs, self._pp_hidden)
        if self._pp_fake_kv is not None:
            keys, values = zero_kv(self._pp_fake_kv, lead_of(self, x))
            return self._copy_kv(args, kwargs, x, keys, values)
        if self._pp_advance:
            batch, length = lead_of(self, x)
            for value in (*args, *kwargs.values()):
                if _is_cache(value) and not (
                    self._pp_own_advance is not None and self._pp_own_advance(value, length, batch)
                ):
                    _advance(value, length, batch)
        if self._pp_returns is not None:
            return self._pp_returns(x, None, None)
        if not self._pp_carries:
            return x
        handed = [carry.arg(args, kwargs, slot) for slot in self._pp_carries]
        if self._pp_placeholder is not None:
            zeros = carry.placeholders(self._pp_placeholder, lead_of(self, x))
            if self._pp_codec is not None:
                zeros = tuple(self._pp_codec[1](z, None) for z in zeros)
            handed = [z if v is None else v for v, z in zip(handed, zeros, strict=True)]
        return (x, *handed)

    def _copy_kv(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        x: mx.array,
        keys: mx.array,
        values: mx.array,
    ) -> Any:
        """A shared-KV source's part on a rank that keeps a copy of its cache:
        the new keys and values go into the copy, as the source's own went in."""
        cache = cache_arg(args, kwargs)
        offset = None
        if cache is not None:
            offset = cache.offset
            keys, values = cache.update_and_fetch(keys, values)
        if self._pp_returns is not None:
            return self._pp_returns(x, (keys, values), offset)
        return x


# While set, stage ends neither receive nor send: a rank runs its own stage alone.
_ALONE: ContextVar[bool] = ContextVar("ppwrap_stage_alone", default=False)


@contextmanager
def stage_alone() -> Iterator[None]:
    """Run this rank's layers without its peers: no receives (the layers take
    zeros of the agreed shape) and no sends. For timing a stage on its own."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


@contextmanager
def added_to(cache: Any) -> Iterator[list[tuple[mx.array, mx.array]]]:
    """The keys and values each ``cache.update_and_fetch`` adds while in the block."""
    seen: list[tuple[mx.array, mx.array]] = []
    if cache is None:
        yield seen
        return
    real = cache.update_and_fetch

    def update_and_fetch(keys: mx.array, values: mx.array) -> Any:
        seen.append((keys, values))
        return real(keys, values)

    cache.update_and_fetch = update_and_fetch  # this instance only
    try:
        yield seen
    finally:
        del cache.update_and_fetch


class KVSource:
    """Mixed into a local layer whose new keys and values layers on later
    ranks read: keeps them (``stage.kv_now``) for this rank's next message."""

    _pp_stage: Stage
    _pp_index: int
    _pp_hidden: int
    _pp_new_kv: Any = None  # SharedKV.new_kv

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        cache = cache_arg(args, kwargs)
        with added_to(cache) as seen:
            out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if seen:
            stage.kv_now[self._pp_index] = seen[-1]
        elif self._pp_new_kv is not None:
            stage.kv_now[self._pp_index] = self._pp_new_kv(out)
        else:
            # No cache and no way to tell: nobody reads a cache that is not there.
            lead = lead_of(self, hidden_of(args, kwargs, self._pp_hidden)[0])
            stage.kv_now[self._pp_index] = zero_kv(stage.kv_wires[self._pp_index], lead)
        return out


class KVMirror(Skipped):
    """Mixed into a source layer another rank runs, where this rank runs layers
    that read its keys and values: its cache here is filled with the new keys
    and values that come with the previous stage's message, so it holds what
    the source's own cache holds."""

    _pp_stage: Stage
    _pp_index: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        x, _ = hidden_of(args, kwargs, self._pp_hidden)
        lead = lead_of(self, x)
        if _ALONE.get():
            keys, values = zero_kv(stage.kv_wires[self._pp_index], lead)
        else:
            if not stage.inbox:
                # Before this stage's first layer: take the message now.
                stage.inbox.append(recv_message(stage, stage.rank + 1, stage.receives, lead))
            keys, values = stage.inbox[0].kv[self._pp_index]
        return self._copy_kv(args, kwargs, x, keys, values)


class StageEnd:
    """Mixed into a local layer that receives from, or sends to, another stage."""

    _pp_recv_from: int | None
    _pp_send_to: int | None
    _pp_stage: Stage
    _pp_hidden: int
    _pp_carries: tuple[int | str, ...] = ()
    _pp_codec: Any = None
    _pp_state: Any = None  # Adapter.state
    # The first stage's first layer in a looped stack: receives from the final
    # rank on every run after the first.
    _pp_loop_from: int | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        if _ALONE.get():
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        loop = stage.loop_of(self)
        if self._pp_recv_from is not None:
            args, kwargs = self._receive(stage, args, kwargs, self._pp_recv_from, stage.receives)
        elif loop and self._pp_loop_from is not None:
            args, kwargs = self._receive(stage, args, kwargs, self._pp_loop_from, stage.closure)
        out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if self._pp_send_to is None:
            return out
        count = len(self._pp_carries)
        if count and (not isinstance(out, tuple) or len(out) < count + 1):
            raise TypeError(
                f"layer {type(self).__mro__[2].__qualname__} returned "
                f"{type(out).__name__}; its adapter says it returns the hidden "
                f"state and {count} carried value(s)."
            )
        hidden, carried = carry.split_output(out, count, self._pp_codec)
        if not isinstance(hidden, mx.array):
            raise TypeError(
                f"layer {type(self).__mro__[2].__qualname__} returned "
                f"{type(hidden).__name__}, not an array; a layer that returns more "
                "needs an adapter that says what it carries (Adapter.carries)."
            )
        local = hidden
        hidden = encode_hidden(self, hidden)  # (batch, length, ...)
        chunk = hidden.shape[1] > 1
        self._check_sends(stage, hidden, carried)
        state = self._pp_state
        given = state.give(stage.owner, stage.end, args, kwargs) if state else []
        hidden = decode_hidden(
            self, send_message(stage, self._pp_send_to, hidden, carried, given), local
        )
        if loop < stage.loops - 1:
            # Sent now, not when the output is evaluated: this rank's next run
            # receives first, and a receive evaluated before this send would
            # leave the next stage waiting for it (and this rank for that).
            mx.eval(hidden)
        if chunk:
            # A prompt chunk, where loops may evaluate only the caches. Not
            # while decoding: the next step would read the cache through the
            # send still in flight, and on a GPU that wait deadlocks (see
            # PipelineHead.broadcast); decode loops evaluate the output.
            stage.unchained.append(hidden)  # the backbone chains it into the cache
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _receive(
        self,
        stage: Stage,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        source: int,
        wire: Wire | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x, key = hidden_of(args, kwargs, self._pp_hidden)
        state = self._pp_state
        parts = state.layout(stage.owner, stage.start, args, kwargs) if state else []
        message = (
            stage.inbox.pop()
            if stage.inbox
            else recv_message(stage, source, wire, lead_of(self, x), parts)
        )
        hidden = decode_hidden(self, message.hidden, x)
        args, kwargs = replace_hidden(args, kwargs, self._pp_hidden, key, hidden)
        args, kwargs = take_carried(self, args, kwargs, message.carried)
        if state:
            args, kwargs = state.take(stage.owner, stage.start, args, kwargs, message.state)
        return args, kwargs

    def _check_sends(self, stage: Stage, hidden: mx.array, carried: tuple[Any, ...]) -> None:
        # Checked while the graph is built: nothing has been sent yet.
        what = ""
        if stage.sends is not None and Wire.of(hidden) != stage.sends:
            what = f"its hidden state as {Wire.of(hidden).describe()}"
            agreed = stage.sends.describe()
        elif self._pp_carries and carry.form_of(carried, Wire) != stage.carry_out:
            what = f"carried values {carry.form_of(carried, Wire)}"
            agreed = str(stage.carry_out)
        if what:
            raise StageMismatchError(
                f"rank {stage.rank} would send {what}, but rank {self._pp_send_to} "
                f"receives {agreed} (agreed at the handshake). A layer's output "
                "changed after ppwrap.pipeline: split the model once it is in the "
                "dtype it runs in."
            )


class Backbone:
    """Mixed into a split backbone: chains each prompt chunk's send into the
    prompt cache once the backbone has run.

    Loops that evaluate only the cache after a chunk (mlx-lm's
    ``generate_step``) then still run the send, however the model is called:
    through ``PipelineHead`` (which runs an adapter's own backbone call
    through :meth:`_ppwrap_run`) or the mlx-lm model itself.
    """

    _ppwrap_stage: Stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = super().__call__  # type: ignore[misc]
        return self._ppwrap_run(lambda: call(*args, **kwargs), cache_arg(args, kwargs))

    def _ppwrap_run(self, run: Callable[[], Any], cache: Any) -> Any:
        unchained = self._ppwrap_stage.unchained
        unchained.clear()
        try:
            return run()
        finally:
            # Also when it raised: an adapter may stop the backbone early
            # that way (gemma3n's, once its norm returns).
            if unchained and isinstance(cache, (list, tuple)):
                for sent in unchained:
                    chain_into(cache, sent)
            unchained.clear()


class LoopBack(Skipped):
    """Mixed into the final rank's copy of the first layer, in a looped stack:
    on every run after the first, its input (the next run's, after whatever
    the backbone does between runs) goes to the first stage."""

    _pp_stage: Stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        x, key = hidden_of(args, kwargs, self._pp_hidden)
        if stage.loop_of(self) and not _ALONE.get():
            if Wire.of(x) != stage.closure:
                raise StageMismatchError(
                    f"rank {stage.rank} would hand the first stage {Wire.of(x).describe()} "
                    f"between runs of the layers, but it takes {stage.closure}."
                )
            x = send_message(stage, stage.size - 1, x)
            mx.eval(x)  # before this rank's next receive (see StageEnd)
            args, kwargs = replace_hidden(args, kwargs, self._pp_hidden, key, x)
        return super().__call__(*args, **kwargs)


class ShapeOnly:
    """Mixed into the input embedding of a rank that receives its input instead.

    The result is replaced by the received hidden state (in the dtype the
    previous stage sends), so only its shape and dtype matter. They stay the
    embedding's own: backbones derive values from them before the first layer
    (ministral3 casts its attention scale to the embedding's dtype).
    """

    _pp_tail: tuple[int, ...]
    _pp_dtype: mx.Dtype

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return mx.zeros((*x.shape, *self._pp_tail), dtype=self._pp_dtype)
