"""Split any mlx-lm decoder into pipeline stages, in place.

The backbone's own ``__call__`` keeps running unchanged; only its layers change
class:

- layers another rank owns pass the hidden state through, their weights
  dropped; their caches still advance (by zero-width updates) so that masks a
  backbone builds from any layer's cache see the right offset;
- the first local layer receives the hidden state from the previous stage;
- the last local layer sends it on to the next stage (all but the final rank).

Global layer indices never change, so checkpoints load as they are and every
per-layer rule a family has (sliding windows, hybrid layers, mask indices) sees
the layer it expects. Unlike mlx-lm's ``PipelineMixin`` there is no
``all_gather`` of the hidden state at the end: the final rank has all it needs,
and the next token reaches the other ranks through one small broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from . import _carry as carry
from ._adapter import Adapter, Parts, resolve
from ._errors import StageMismatchError, UnsplittableModelError
from ._handshake import fingerprint
from ._handshake import handshake as exchange

__all__ = [
    "Stage",
    "Wire",
    "default_comm_stream",
    "even_split",
    "pipeline",
    "receive_ahead",
    "stage_alone",
    "stage_of",
]

LAYER_NAMES = ("layers", "h", "blocks")
# The dtypes a hidden state may cross a stage boundary in.
WIRE_DTYPES = ("float16", "bfloat16", "float32")


@attrs.frozen
class Wire:
    """What crosses one stage boundary: the hidden state after ``(batch, length)``.

    Attributes:
        tail: The hidden state's shape after its batch and length axes.
        dtype: Its dtype's name (``"float32"``).
    """

    tail: tuple[int, ...]
    dtype: str

    @classmethod
    def of(cls, x: mx.array) -> Wire:
        return cls(tuple(x.shape[2:]), str(x.dtype).removeprefix("mlx.core."))

    def describe(self) -> str:
        return f"{self.dtype} (batch, length, {', '.join(map(str, self.tail))})"

    def zeros(self, lead: Sequence[int]) -> mx.array:
        return mx.zeros((*lead, *self.tail), dtype=getattr(mx, self.dtype))


# Control words riding on each decode step's stage message (see ``Ring``).
HEADER_WORDS = 2


@attrs.define
class Ring:
    """Control words that ride on the stage messages while a loop decodes.

    With the ring on, every stage message ends with ``HEADER_WORDS`` uint32
    words (bit-cast into the hidden state's dtype, appended on its last
    axis): the first stage writes them, the ranks after it read and forward
    them. The decode loop uses them to tell every rank the last token and
    whether to stop, with no collective (see ``ppwrap._generate``).

    Attributes:
        on: Whether stage messages carry the words.
        header: The words the first stage sends with its next message.
        received: The words that came with the last message received.
    """

    on: bool = False
    header: mx.array | None = None
    received: mx.array | None = None


@attrs.frozen
class Stage:
    """One rank's place in a pipeline made by :func:`pipeline`.

    Attributes:
        rank: The rank in the group; rank 0 runs the last layers.
        size: The number of stages.
        start: The first global layer index this rank runs.
        end: One past the last global layer index this rank runs.
        split: Layers per rank, indexed by rank.
        group: The group the stages communicate over.
        stream: The stream sends and receives run on (``None``: the default).
        received: The hidden state this rank last received from the previous
            stage (lazy; at most one): a generate loop may evaluate it on its
            own to wait for the previous stage before running its layers.
        receives: What this rank receives from the previous stage (``None`` on
            the first stage): what that stage really produces, found at the
            handshake.
        sends: What this rank sends to the next stage (``None`` on the final
            rank).
        carry_in: The forms of what the previous stage's message carries
            besides the hidden state (``Adapter.carries``); ``None``: nothing.
        carry_out: The same for this rank's message to the next stage.
        loops: How many times the backbone runs its layers per token
            (``Adapter.loops``); between runs the final rank hands the
            first stage the next run's input.
        closure: What the final rank hands the first stage between runs.
        kv_in: The shared-KV source layers whose new keys and values come with
            the previous stage's message (``Adapter.shared_kv``).
        kv_out: Those this rank's message to the next stage carries.
        mirrors: The source layers another rank runs whose cache this rank
            keeps a copy of, for its own layers that read it.
        ring: The decode loop's control words (see :class:`Ring`).
    """

    rank: int
    size: int
    start: int
    end: int
    split: tuple[int, ...]
    group: mx.distributed.Group = attrs.field(eq=False, repr=False)
    stream: Any = attrs.field(default=None, eq=False)
    received: list[mx.array] = attrs.field(factory=list, eq=False, repr=False)
    receives: Wire | None = None
    sends: Wire | None = None
    carry_in: tuple[carry.Form, ...] | None = None
    carry_out: tuple[carry.Form, ...] | None = None
    loops: int = 1
    closure: Wire | None = None
    kv_in: tuple[int, ...] = ()
    kv_out: tuple[int, ...] = ()
    mirrors: tuple[int, ...] = ()
    kv_wires: dict[int, tuple[Wire, Wire]] = attrs.field(factory=dict, eq=False, repr=False)
    # The backbone, for the adapter's state functions; whether every rank
    # embeds the token (a decode loop then hands later ranks the real one).
    owner: Any = attrs.field(default=None, eq=False, repr=False)
    embeds_everywhere: bool = False
    ring: Ring = attrs.field(factory=Ring, eq=False, repr=False)
    # The running forward pass's message, when a layer before this stage took
    # it early (a source's copy), and the new keys and values of each source.
    inbox: list[Any] = attrs.field(factory=list, eq=False, repr=False)
    kv_now: dict[int, tuple[mx.array, mx.array]] = attrs.field(factory=dict, eq=False, repr=False)
    # Calls of each boundary layer so far (looped stacks).
    calls: dict[int, int] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def is_final(self) -> bool:
        return self.rank == 0

    @property
    def is_first(self) -> bool:
        return self.rank == self.size - 1

    @property
    def in_flight(self) -> int:
        """How many micro-batches a decode loop may keep in flight: one per
        stage, or one in all for a looped stack, whose messages between the
        final rank and the first stage would otherwise interleave."""
        return self.size if self.loops == 1 else 1

    def loop_of(self, layer: object) -> int:
        """Which run of the layers this call of ``layer`` is in (0 without loops).

        Counted per layer across forward passes: each pass calls every layer
        once per run (a pass cut short leaves the ranks out of step anyway).
        """
        if self.loops == 1:
            return 0
        calls = self.calls.get(id(layer), 0)
        self.calls[id(layer)] = calls + 1
        return calls % self.loops


def even_split(num_layers: int, size: int) -> list[int]:
    """Layers per rank for an even split; the low ranks get the extra layers.

    This is mlx-lm's default, so both pipelines put the same layers on a rank.
    """
    if size < 1:
        raise ValueError(f"a pipeline needs at least 1 rank; got {size}")
    if size > num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers over {size} ranks: every rank needs "
            f"at least one layer. Use at most {num_layers} ranks."
        )
    base, extra = divmod(num_layers, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def balanced_split(costs: Sequence[float], head: float, size: int) -> list[int]:
    """Layers per rank (indexed by rank) that balance the stages' cost.

    Stages are contiguous, the first layers on rank ``size - 1`` and the last on
    rank 0, which also carries ``head``. The split minimises the largest stage's
    cost (the first such split found); every rank gets at least one layer.

    Args:
        costs: Each layer's cost, in order (bytes read per token, say).
        head: The output head's cost, on the final stage.
        size: The number of ranks.
    """
    n = len(costs)
    even_split(n, size)  # the same errors for too many ranks
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the least largest cost of the first i layers on k stages.
    best = [[inf] * (n + 1) for _ in range(size + 1)]
    cut = [[0] * (n + 1) for _ in range(size + 1)]
    best[0][0] = 0.0
    for k in range(1, size + 1):
        for i in range(k, n + 1):
            last = k == size  # the stage with the last layers: the final rank
            for j in range(k - 1, i):
                stage = prefix[i] - prefix[j] + (head if last and i == n else 0.0)
                worst = max(best[k - 1][j], stage)
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    bounds, i = [], n
    for k in range(size, 0, -1):
        j = cut[k][i]
        bounds.append(i - j)
        i = j
    # bounds holds the stages from the last layers back: rank 0 first.
    return bounds


def check_split(split: Sequence[int], num_layers: int, size: int) -> list[int]:
    """Validate an explicit split (layers per rank, indexed by rank)."""
    split = list(split)
    if len(split) != size:
        raise ValueError(
            f"split {split} has {len(split)} entries but the group has {size} "
            "ranks; give one layer count per rank."
        )
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in split):
        raise ValueError(f"split {split}: every rank needs a whole, positive number of layers.")
    if sum(split) != num_layers:
        raise ValueError(
            f"split {split} sums to {sum(split)} but the model has {num_layers} layers."
        )
    return split


def default_comm_stream() -> Any:
    """The stream for pipeline sends, receives and the token broadcast.

    MLX runs the ring backend's communication on the CPU whatever stream it is
    given: Metal has no GPU kernels for it, and MLX CUDA none for send and
    receive. Where the default device is a GPU, ppwrap says so (``mx.cpu``);
    on the CPU the default stream is used.
    """
    return mx.cpu if mx.default_device() == mx.gpu else None


def stage_of(backbone: nn.Module) -> Stage | None:
    """The stage :func:`pipeline` gave this backbone, or ``None``."""
    stage = getattr(backbone, "_ppwrap_stage", None)
    return stage if isinstance(stage, Stage) else None


def layer_list(parts: Parts) -> list[Any]:
    """The backbone's list of layers, in global order."""
    path = parts.adapter.layers
    if path and "+" in path:
        # Several lists run one after another (afm7: layers, then kv_reuse_layers).
        joined = [
            layer
            for part in path.split("+")
            for layer in layer_list(
                attrs.evolve(parts, adapter=attrs.evolve(parts.adapter, layers=part))
            )
        ]
        return joined
    names = (path,) if path else LAYER_NAMES
    for name in names:
        obj: Any = parts.backbone
        for attr in name.split("."):
            obj = getattr(obj, attr, None)
        # Some backbones keep the list in a decoder module (plamo: layers.layers).
        if isinstance(obj, nn.Module) and not path:
            obj = getattr(obj, "layers", None)
        if isinstance(obj, list) and obj:
            return obj
    raise UnsplittableModelError(
        f"Model type {parts.adapter.model_type!r}: cannot find the layer list of "
        f"{type(parts.backbone).__qualname__}; looked for a non-empty list named one "
        f"of {list(names)} (or a module holding one as .layers). Register an adapter with layers='...' (see docs/adapters.md)."
    )


# ---------------------------------------------------------------- layer roles


def parameter_arrays(module: nn.Module) -> list[mx.array]:
    """Every parameter array of ``module``."""
    flat = cast("list[tuple[str, mx.array]]", tree_flatten(module.parameters()))
    return [array for _, array in flat]


def nbytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters (dropped weights count 0)."""
    return sum(array.nbytes for array in parameter_arrays(module))


def empty_weights(module: nn.Module) -> None:
    """Drop a module's weights (before they are read, with lazy loading)."""
    module.update(tree_map(lambda _: mx.zeros((0,)), module.parameters()))


def multiply_adds(module: nn.Module) -> int:
    """Multiply-adds per token of ``module``'s weights: one per weight element
    (a quantized weight packs ``32 / bits`` elements in each word)."""
    total = 0
    for _, leaf in module.named_modules():
        weight = leaf.get("weight")  # a module holds its own parameters as items
        if not isinstance(weight, mx.array) or weight.ndim < 2:
            continue  # norms and biases: negligible
        bits = getattr(leaf, "bits", None)
        total += weight.size * (32 // bits if bits and weight.dtype == mx.uint32 else 1)
    return total


def auto_split(
    parts: Parts, layers: Sequence[nn.Module], size: int, *, by: str | None = None
) -> list[int]:
    """:func:`balanced_split` by each layer's and the head's cost per decoded token.

    ``by="bytes"``: the bytes their weights read, what bounds a GPU (decoding
    reads every weight once per token); ``by="flops"``: their multiply-adds,
    what bounds a CPU, where an 8-bit head costs no more per weight than a
    4-bit layer. The default picks by the default device. The final rank also
    runs the head (the embedding, when it is tied). Lazy arrays know their
    size, so nothing is read to decide.
    """
    by = by or ("bytes" if mx.default_device() == mx.gpu else "flops")
    if by not in ("bytes", "flops"):
        raise ValueError(f"auto_split: by must be 'bytes' or 'flops'; got {by!r}")
    cost = nbytes if by == "bytes" else multiply_adds
    if parts.tied and parts.embedding is not None:
        head = cost(parts.embedding)
    else:
        head = sum(cost(m) for m in parts.head_modules())
        if by == "bytes":
            head += sum(getattr(o, n).nbytes for o, n in parts.head_arrays())
        else:
            head += sum(getattr(o, n).size for o, n in parts.head_arrays())
    return balanced_split([float(cost(layer)) for layer in layers], float(head), size)


def drop_head(parts: Parts) -> None:
    """Drop the weights only the output head uses (before they are read)."""
    for module in parts.head_modules():
        empty_weights(module)
    for owner, name in parts.head_arrays():
        owner.update({name: mx.zeros((0,))})


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


def _chain(cache: Any, sent: mx.array) -> None:
    """Make the cache's state depend on the send, so evaluating the cache sends.

    Loops that evaluate only the cache after a prefill chunk (mlx-lm's
    ``generate_step`` does) would otherwise never run this rank's send.
    """
    from mlx_lm.models.cache import ArraysCache, CacheList

    if isinstance(cache, (CacheList, list, tuple)):
        for c in cache.caches if isinstance(cache, CacheList) else cache:
            _chain(c, sent)
    elif isinstance(cache, ArraysCache):
        if cache[0] is not None:
            cache[0] = mx.depends(cache[0], sent)
    elif getattr(cache, "keys", None) is not None and isinstance(cache.keys, mx.array):
        cache.keys = mx.depends(cache.keys, sent)


def _is_cache(value: Any) -> bool:
    from mlx_lm.models.cache import _BaseCache

    if isinstance(value, (list, tuple)):
        return any(_is_cache(v) for v in value)
    # A family's own cache class keeps an offset and a state, as mlx-lm's do.
    return isinstance(value, _BaseCache) or (hasattr(value, "offset") and hasattr(value, "state"))


HIDDEN_KEYWORDS = ("x", "h", "hidden_states", "inputs", "hidden")


def _hidden(
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


class _Skipped:
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
        x, _ = _hidden(args, kwargs, self._pp_hidden)
        if self._pp_fake_kv is not None:
            keys, values = (_kv_from_wire(w.zeros(_lead(self, x))) for w in self._pp_fake_kv)
            return self._copy_kv(args, kwargs, x, keys, values)
        if self._pp_advance:
            batch, length = _lead(self, x)
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
            zeros = carry.placeholders(self._pp_placeholder, _lead(self, x))
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
        cache = _cache_arg(args, kwargs)
        offset = None
        if cache is not None:
            offset = cache.offset
            keys, values = cache.update_and_fetch(keys, values)
        if self._pp_returns is not None:
            return self._pp_returns(x, (keys, values), offset)
        return x


def _replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, key: str | None, x: mx.array
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if key is None:
        return (*args[:index], x, *args[index + 1 :]), kwargs
    return args, {**kwargs, key: x}


def _encode(layer: Any, x: mx.array) -> mx.array:
    """A layer's hidden state as it crosses a boundary: ``(batch, length, ...)``,
    through the adapter's ``hidden_codec`` where it has one."""
    codec = getattr(layer, "_pp_hidden_codec", None)
    return x if codec is None else cast("mx.array", codec[0](x))


def _decode(layer: Any, x: mx.array, local: mx.array) -> mx.array:
    codec = getattr(layer, "_pp_hidden_codec", None)
    return x if codec is None else cast("mx.array", codec[1](x, local))


def _lead(layer: Any, x: mx.array) -> tuple[int, ...]:
    """The (batch, length) axes of a layer's hidden state as it crosses a boundary."""
    return tuple(_encode(layer, x).shape[:2])


def _kv_to_wire(a: mx.array) -> mx.array:
    """Keys or values ``(batch, heads, length, dim)`` as ``(batch, length, heads, dim)``."""
    return mx.moveaxis(a, 2, 1)


def _kv_from_wire(a: mx.array) -> mx.array:
    return mx.moveaxis(a, 1, 2)


def _cache_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for value in (*args, *kwargs.values()):
        if _is_cache(value):
            return value
    return None


@attrs.define
class _Message:
    """One received stage message, unpacked."""

    hidden: mx.array
    carried: tuple[Any, ...]
    kv: dict[int, tuple[mx.array, mx.array]]
    state: list[mx.array]


def _recv_message(
    stage: Stage,
    source: int,
    wire: Wire | None,
    lead: Sequence[int],
    state: Sequence[carry.Part] = (),
) -> _Message:
    """Receive a stage message: the hidden state (in the shape and dtype the
    previous stage really sends, agreed at the handshake, not this rank's own
    guess from its embedding), what the layers carry, shared keys and values,
    and the family's other state (``Adapter.state``, in ``state``'s parts)."""
    assert wire is not None, "a receiving stage has no agreed wire"
    template = wire.zeros(lead)
    if stage.ring.on:
        template = _with_header(template, mx.zeros((HEADER_WORDS,), mx.uint32))
    forms = stage.carry_in or ()
    kv_wires = [w for s in stage.kv_in for w in stage.kv_wires[s]]
    extra = [carry.part_of(w, lead) for w in [*carry.wires(forms), *kv_wires]]
    if extra or state:
        # One message: the hidden state and the rest, as bytes.
        layout = [(tuple(template.shape), template.dtype), *extra, *state]
        message = mx.distributed.recv_like(
            carry.packed_zeros(layout), source, group=stage.group, stream=stage.stream
        )
        x, *arrays = carry.unpack(message, layout)
    else:
        x = mx.distributed.recv_like(template, source, group=stage.group, stream=stage.stream)
        arrays = []
    given = arrays[len(arrays) - len(state) :] if state else []
    arrays = arrays[: len(arrays) - len(state)]
    if stage.ring.on:
        x, stage.ring.received = _split_header(x)
    stage.received[:] = [x]
    count = len(carry.wires(forms))
    carried = carry.rebuild(forms, arrays[:count])
    kvs = [_kv_from_wire(a) for a in arrays[count:]]
    kv = {s: (kvs[2 * i], kvs[2 * i + 1]) for i, s in enumerate(stage.kv_in)}
    stage.kv_now.update(kv)
    return _Message(x, carried, kv, given)


def receive_ahead(stage: Stage, lead: Sequence[int]) -> mx.array:
    """Take this rank's next stage message now, before its forward pass, and
    return the control words it carries (the ring must be on).

    A decode loop on a rank after the first learns each token only from the
    stage message; families that embed the token on every rank
    (``Adapter.embedding_everywhere``) need it before their layers run. The
    forward pass then takes the message from ``stage.inbox``.
    """
    assert stage.ring.on, "only ring messages carry words"
    stage.inbox.append(_recv_message(stage, stage.rank + 1, stage.receives, lead))
    return cast("mx.array", stage.ring.received)


@contextmanager
def _added_to(cache: Any) -> Iterator[list[tuple[mx.array, mx.array]]]:
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


class _KVSource:
    """Mixed into a local layer whose new keys and values layers on later
    ranks read: keeps them (``stage.kv_now``) for this rank's next message."""

    _pp_stage: Stage
    _pp_index: int
    _pp_hidden: int
    _pp_new_kv: Any = None  # SharedKV.new_kv

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        cache = _cache_arg(args, kwargs)
        with _added_to(cache) as seen:
            out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if seen:
            stage.kv_now[self._pp_index] = seen[-1]
        elif self._pp_new_kv is not None:
            stage.kv_now[self._pp_index] = self._pp_new_kv(out)
        else:
            # No cache and no way to tell: nobody reads a cache that is not there.
            k_wire, v_wire = stage.kv_wires[self._pp_index]
            lead = _lead(self, _hidden(args, kwargs, self._pp_hidden)[0])
            stage.kv_now[self._pp_index] = (
                _kv_from_wire(k_wire.zeros(lead)),
                _kv_from_wire(v_wire.zeros(lead)),
            )
        return out


class _KVMirror(_Skipped):
    """Mixed into a source layer another rank runs, where this rank runs layers
    that read its keys and values: its cache here is filled with the new keys
    and values that come with the previous stage's message, so it holds what
    the source's own cache holds."""

    _pp_stage: Stage
    _pp_index: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        x, _ = _hidden(args, kwargs, self._pp_hidden)
        lead = _lead(self, x)
        if _ALONE.get():
            keys, values = (_kv_from_wire(w.zeros(lead)) for w in stage.kv_wires[self._pp_index])
        else:
            if not stage.inbox:
                # Before this stage's first layer: take the message now.
                stage.inbox.append(_recv_message(stage, stage.rank + 1, stage.receives, lead))
            keys, values = stage.inbox[0].kv[self._pp_index]
        return self._copy_kv(args, kwargs, x, keys, values)


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


class _StageEnd:
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
        # A tuple: the hidden state, what the next layer takes (carried) and
        # what stays on this rank (a shared-KV family's keys and values).
        hidden, carried = (out[0], out[1 : count + 1]) if isinstance(out, tuple) else (out, ())
        if self._pp_codec is not None:
            carried = tuple(self._pp_codec[0](v) for v in carried)
        if not isinstance(hidden, mx.array):
            raise TypeError(
                f"layer {type(self).__mro__[2].__qualname__} returned "
                f"{type(hidden).__name__}, not an array; a layer that returns more "
                "needs an adapter that says what it carries (Adapter.carries)."
            )
        local = hidden
        hidden = _encode(self, hidden)
        self._check_sends(stage, hidden, carried)
        state = self._pp_state
        given = state.give(stage.owner, stage.end, args, kwargs) if state else []
        hidden = _decode(self, _send(stage, self._pp_send_to, hidden, carried, given), local)
        if loop < stage.loops - 1:
            # Sent now, not when the output is evaluated: this rank's next run
            # receives first, and a receive evaluated before this send would
            # leave the next stage waiting for it (and this rank for that).
            mx.eval(hidden)
        if hidden.shape[1] > 1:
            # A prompt chunk, where loops may evaluate only the caches. Not
            # while decoding: the next step would read the cache through the
            # send still in flight, and on a GPU that wait deadlocks (see
            # PipelineHead.broadcast); decode loops evaluate the output.
            for value in (*args, *kwargs.values()):
                if _is_cache(value):
                    _chain(value, hidden)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def _receive(
        self,
        stage: Stage,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        source: int,
        wire: Wire | None,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x, key = _hidden(args, kwargs, self._pp_hidden)
        state = self._pp_state
        parts = state.layout(stage.owner, stage.start, args, kwargs) if state else []
        message = (
            stage.inbox.pop()
            if stage.inbox
            else _recv_message(stage, source, wire, _lead(self, x), parts)
        )
        hidden = _decode(self, message.hidden, x)
        args, kwargs = _replace_hidden(args, kwargs, self._pp_hidden, key, hidden)
        args, kwargs = _take_carried(self, args, kwargs, message.carried)
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


def _send(
    stage: Stage,
    to: int,
    hidden: mx.array,
    carried: tuple[Any, ...] = (),
    state: Sequence[mx.array] = (),
) -> mx.array:
    """Send a stage message; returns the hidden state, now depending on the send."""
    width = hidden.shape[-1]
    if stage.ring.on:
        words = stage.ring.header if stage.ring.header is not None else stage.ring.received
        assert words is not None, "the ring is on but there are no words to send"
        message = _with_header(hidden, words)
    else:
        message = hidden
    arrays = carry.leaves(carried)
    arrays += [_kv_to_wire(a) for s in stage.kv_out for a in stage.kv_now[s]]
    arrays += state
    if arrays:
        packed = carry.pack([message, *arrays])
        sent = mx.distributed.send(packed, to, group=stage.group, stream=stage.stream)
        return cast("mx.array", mx.depends(hidden, sent))
    sent = mx.distributed.send(message, to, group=stage.group, stream=stage.stream)
    return sent[..., :width] if stage.ring.on else sent


class _LoopBack(_Skipped):
    """Mixed into the final rank's copy of the first layer, in a looped stack:
    on every run after the first, its input (the next run's, after whatever
    the backbone does between runs) goes to the first stage."""

    _pp_stage: Stage

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        stage = self._pp_stage
        x, key = _hidden(args, kwargs, self._pp_hidden)
        if stage.loop_of(self) and not _ALONE.get():
            if Wire.of(x) != stage.closure:
                raise StageMismatchError(
                    f"rank {stage.rank} would hand the first stage {Wire.of(x).describe()} "
                    f"between runs of the layers, but it takes {stage.closure}."
                )
            x = _send(stage, stage.size - 1, x)
            mx.eval(x)  # before this rank's next receive (see _StageEnd)
            args, kwargs = _replace_hidden(args, kwargs, self._pp_hidden, key, x)
        return super().__call__(*args, **kwargs)


def _with_header(x: mx.array, words: mx.array) -> mx.array:
    """``x`` with ``words`` (uint32) bit-cast to its dtype and appended on its last axis.

    ``words`` is one row's ``(HEADER_WORDS,)``, the same for every sequence of
    the batch, or ``(B, HEADER_WORDS)``, one row per sequence.
    """
    batch, length = x.shape[0], x.shape[1]
    words = mx.broadcast_to(words.astype(mx.uint32), (batch, words.shape[-1]))
    cells = mx.view(mx.contiguous(words), x.dtype)
    cells = mx.broadcast_to(cells[:, None, :], (batch, length, cells.shape[-1]))
    return mx.concatenate([x, cells], axis=-1)


def _split_header(message: mx.array) -> tuple[mx.array, mx.array]:
    """The hidden state and the words, ``(B, HEADER_WORDS)``, of a message from
    :func:`_with_header`."""
    width = HEADER_WORDS * 4 // message.itemsize
    cells = message[:, 0, -width:].reshape(message.shape[0], width)
    return message[..., :-width], mx.view(cells, mx.uint32)


class _ShapeOnly:
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


class _Probed(Exception):
    """Ends a probe run of the backbone at the last layer it looks at."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out


def _take_carried(
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
            x, key = _hidden(args, kwargs, self._pp_hidden)
            if self._pp_probe_dtype is not None:
                x = mx.zeros(x.shape, getattr(mx, self._pp_probe_dtype))
                args, kwargs = _replace_hidden(args, kwargs, self._pp_hidden, key, x)
            if self._pp_probe_arriving is not None:
                held = carry.placeholders(self._pp_probe_arriving, _lead(self, x))
                args, kwargs = _take_carried(self, args, kwargs, held)
            self._pp_probe_seen = Wire.of(_encode(self, x))
        out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if self._pp_probe_last:
            raise _Probed(out)
        return out


_subclasses: dict[tuple[type, type], type] = {}


def _mix(obj: nn.Module, role: type) -> None:
    cls = type(obj)
    key = (role, cls)
    if key not in _subclasses:
        _subclasses[key] = type(f"{role.__name__.lstrip('_')}{cls.__name__}", (role, cls), {})
    obj.__class__ = _subclasses[key]


# ------------------------------------------------------------ stage wires


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
            _mix(layer, _Skipped)
            if arriving is not None:
                object.__setattr__(layer, "_pp_placeholder", arriving)
        for i, wires in (kv_wires or {}).items():
            if i < lo:
                object.__setattr__(layers[i], "_pp_fake_kv", wires)
        for layer in ends.values():
            _mix(layer, _Probe)
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
        if carries:
            codec = parts.adapter.carry_codec
            carried = out[1 : len(carries) + 1]
            forms = carry.form_of(tuple(codec[0](v) for v in carried) if codec else carried, Wire)
        out = out[0]
    if not isinstance(out, mx.array):
        raise TypeError(
            f"layer {hi - 1} of model type {parts.adapter.model_type!r} returned "
            f"{type(out).__name__}, not an array; a layer that returns more needs an "
            "adapter that says what it carries (Adapter.carries)."
        )
    return seen, Wire.of(_encode(layers[hi - 1], out)), forms


class _Reentry:
    """Mixed into the first layer for :func:`probe_closure`."""

    _pp_hidden: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_pp_seen"):
            raise _Probed(Wire.of(_hidden(args, kwargs, self._pp_hidden)[0]))
        self.__dict__["_pp_seen"] = True
        return super().__call__(*args, **kwargs)  # type: ignore[misc]


def probe_closure(parts: Parts, layers: list[Any]) -> Wire:
    """What the first layer takes on its second run, in a looped stack.

    The unsplit model's lazy run, which every rank can make alone: a split
    model hands each stage what the unsplit one computes there.
    """
    first = layers[0]
    cls = type(first)
    _mix(first, _Reentry)
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

    _pp_new_kv: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _added_to(_cache_arg(args, kwargs)) as seen:
            out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        k, v = seen[-1]
        self.__dict__["_pp_kv_seen"] = (Wire.of(_kv_to_wire(k)), Wire.of(_kv_to_wire(v)))
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
        _mix(layers[s], _KVProbe)
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


# ------------------------------------------------------------------ pipeline


def pipeline(
    model: nn.Module,
    group: mx.distributed.Group | None = None,
    *,
    split: Sequence[int] | str | None = None,
    stream: Any = "auto",
    adapter: Adapter | None = None,
    handshake_timeout: float | None = 120.0,
    handshake: bool = True,
    head_on_every_rank: bool = False,
) -> Stage:
    """Give this rank its slice of ``model``'s layers, in place.

    Works for every family ppwrap can wrap, with mlx-lm's convention: rank 0
    runs the last layers, rank ``size - 1`` the first. Each stage receives the
    hidden state in the shape and dtype the previous stage really produces
    (float32 after float32 norms, say, in a float16 checkpoint), agreed at the
    handshake; without one, each rank works it out alone from the layers
    before its own. Wrap the model with
    :meth:`PipelineHead.wrap` afterwards (or before).

    Args:
        model: An mlx-lm ``Model``, loaded or built but not yet pipelined.
        group: The ranks to split over; default ``mx.distributed.init()``.
        split: Layers per rank, indexed by rank; ``"even"`` (the default): the
            extra layers on the low ranks, as mlx-lm splits; ``"auto"``: stages
            balanced by their cost per token (bytes read on a GPU, multiply-adds
            on the CPU), the final rank's head included (:func:`auto_split`),
            so it gets fewer layers.
        stream: Stream for sends and receives; ``"auto"``: see
            :func:`default_comm_stream` (the CPU stream where the default
            device is a GPU).
        adapter: The family adapter; default :func:`ppwrap.find_adapter`.
        handshake_timeout: Seconds to wait for every rank at the handshake
            (``None``: forever); a rank that waits longer names the ranks it
            waited for and exits.
        handshake: Check with every rank that all split the same model the
            same way (one small collective); ``False`` skips it.
        head_on_every_rank: Every rank will run the output head (a wrapper
            with ``elide_output_head=False``), so a tied head's embedding stays
            on every rank.

    Returns:
        This rank's :class:`Stage`.

    Raises:
        ValueError: The split is invalid, there are more ranks than layers, the
            model is already pipelined, or its layers cannot be found.
        HandshakeError: The ranks disagree (another checkpoint, split, adapter
            or version); raised on every rank with the same message.
        StageMismatchError: A stage produces a hidden state the next stage
            cannot take; raised on every rank.
    """
    parts = resolve(model, adapter)
    if parts.adapter.unsplittable:
        raise UnsplittableModelError(
            f"ppwrap.pipeline cannot split model type {parts.adapter.model_type!r}: "
            f"{parts.adapter.unsplittable}"
        )
    backbone = parts.backbone
    if stage_of(backbone) is not None or getattr(backbone, "pipeline_size", 1) > 1:
        raise ValueError(
            f"{type(model).__module__}.{type(model).__qualname__} is already "
            "pipelined (by ppwrap.pipeline or mlx-lm's pipeline()); pipeline a "
            "model once."
        )
    group = group if group is not None else mx.distributed.init()
    layers = layer_list(parts)
    rank, size = group.rank(), group.size()
    if split is None or split == "even":
        split = even_split(len(layers), size)
    elif split == "auto":
        split = auto_split(parts, layers, size)
    elif isinstance(split, str):
        raise ValueError(f"split takes 'even', 'auto' or layers per rank; got {split!r}")
    else:
        split = check_split(split, len(layers), size)
    start = sum(split[rank + 1 :])
    end = start + split[rank]
    for layer in layers:
        layer._pp_hidden = parts.adapter.hidden_arg
        # Not through Module.__setattr__, which keeps tuples as children.
        object.__setattr__(layer, "_pp_carries", parts.adapter.carries)
        object.__setattr__(layer, "_pp_codec", parts.adapter.carry_codec)
        object.__setattr__(layer, "_pp_hidden_codec", parts.adapter.hidden_codec)
        object.__setattr__(layer, "_pp_state", parts.adapter.state)
        object.__setattr__(layer, "_pp_own_advance", parts.adapter.advance)
    shared = parts.adapter.shared_kv
    readers = shared.readers(backbone) if shared is not None else {}
    sources = sorted(set(readers.values()))
    for i, layer in enumerate(layers):
        if shared is not None:
            object.__setattr__(layer, "_pp_returns", shared.returns)
        if i in readers:
            object.__setattr__(layer, "_pp_advance", False)
    loops = int(getattr(backbone, parts.adapter.loops)) if parts.adapter.loops else 1
    if loops > 1 and (parts.adapter.carries or sources):
        raise UnsplittableModelError(
            f"model type {parts.adapter.model_type!r}: ppwrap.pipeline does not split a "
            "looped stack whose layers also carry values or share keys and values."
        )
    kv_wires = probe_kv(parts, model, layers, sources) if size > 1 and sources else {}

    def crossing(boundary: int) -> tuple[int, ...]:
        """The sources whose keys and values a boundary before ``boundary`` carries."""
        return tuple(
            s
            for s in sources
            if s < boundary and any(r >= boundary and readers[r] == s for r in readers)
        )

    links = Links()
    if size > 1:
        # Before any weight is dropped: the probes run layers lazily.
        if handshake:
            fp = fingerprint(model, parts, tuple(split), layers)
            record = stage_record(
                parts, layers, start, end, first=rank == size - 1, kv_wires=kv_wires
            )
            records = exchange(fp, group, timeout=handshake_timeout, stage=record)
            links = link(records)[rank]
        else:
            links = local_wires(parts, layers, start, end, rank=rank, size=size, kv_wires=kv_wires)
    receives = links.receives
    everywhere = parts.adapter.embedding_everywhere
    if callable(everywhere):
        everywhere = everywhere(backbone)
    stage = Stage(
        rank=rank,
        size=size,
        start=start,
        end=end,
        split=tuple(split),
        group=group,
        stream=default_comm_stream() if stream == "auto" else stream,
        receives=receives,
        sends=links.sends,
        carry_in=links.carry_in,
        carry_out=links.carry_out,
        loops=loops,
        closure=probe_closure(parts, layers) if loops > 1 and size > 1 else None,
        kv_in=crossing(start) if rank < size - 1 else (),
        kv_out=crossing(end) if rank > 0 else (),
        mirrors=tuple(
            s
            for s in sources
            if not start <= s < end and any(start <= r < end and readers[r] == s for r in readers)
        ),
        kv_wires=kv_wires,
        owner=backbone,
        embeds_everywhere=bool(everywhere),
    )
    object.__setattr__(backbone, "_ppwrap_stage", stage)
    if size == 1:
        return stage

    for i, layer in enumerate(layers):
        if not start <= i < end:
            empty_weights(layer)
            _mix(layer, _KVMirror if i in stage.mirrors else _Skipped)
            if i < start and links.carry_in is not None:
                object.__setattr__(layer, "_pp_placeholder", links.carry_in)
        elif i in stage.kv_out:
            _mix(layer, _KVSource)  # inside _StageEnd: keeps them before a send
        if i in sources:
            layer._pp_stage = stage
            layer._pp_index = i
            if shared is not None and shared.new_kv is not None:
                object.__setattr__(layer, "_pp_new_kv", shared.new_kv)
    first, last = layers[start], layers[end - 1]
    for layer in {id(first): first, id(last): last}.values():
        layer._pp_stage = stage
        layer._pp_recv_from = rank + 1 if layer is first and not stage.is_first else None
        layer._pp_send_to = rank - 1 if layer is last and not stage.is_final else None
        if loops > 1 and layer is first and stage.is_first:
            layer._pp_loop_from = 0
        if layer._pp_recv_from is not None or layer._pp_send_to is not None or loops > 1:
            _mix(layer, _StageEnd)
    if loops > 1:
        layers[0]._pp_stage = stage
        if stage.is_final:
            _mix(layers[0], _LoopBack)

    embedding = parts.embedding
    everywhere = stage.embeds_everywhere
    if receives is not None and embedding is not None and not everywhere:
        # Lazy: only the shape and dtype are kept, nothing is computed.
        like = embedding(mx.zeros((1, 1), dtype=mx.int32))
        embedding._pp_tail = tuple(like.shape[2:])
        embedding._pp_dtype = like.dtype
        if not ((stage.is_final or head_on_every_rank) and parts.tied):
            empty_weights(embedding)
        _mix(embedding, _ShapeOnly)
    return stage
