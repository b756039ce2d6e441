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
    ring: Ring = attrs.field(factory=Ring, eq=False, repr=False)

    @property
    def is_final(self) -> bool:
        return self.rank == 0

    @property
    def is_first(self) -> bool:
        return self.rank == self.size - 1


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
    return isinstance(value, _BaseCache)


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
    """Mixed into a layer another rank owns: the hidden state passes through."""

    _pp_hidden: int

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        x, _ = _hidden(args, kwargs, self._pp_hidden)
        for value in (*args, *kwargs.values()):
            if _is_cache(value):
                _advance(value, x.shape[1], x.shape[0])
        return x


def _replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], index: int, key: str | None, x: mx.array
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if key is None:
        return (*args[:index], x, *args[index + 1 :]), kwargs
    return args, {**kwargs, key: x}


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

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        stage = self._pp_stage
        if _ALONE.get():
            return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]
        if self._pp_recv_from is not None:
            assert stage.receives is not None, "a receiving stage has no agreed wire"
            x, key = _hidden(args, kwargs, self._pp_hidden)
            # The shape and dtype the previous stage really sends (agreed at the
            # handshake), not this rank's own guess from its embedding.
            template = stage.receives.zeros(x.shape[:2])
            if stage.ring.on:
                template = _with_header(template, mx.zeros((HEADER_WORDS,), mx.uint32))
            x = mx.distributed.recv_like(
                template, self._pp_recv_from, group=stage.group, stream=stage.stream
            )
            if stage.ring.on:
                x, stage.ring.received = _split_header(x)
            stage.received[:] = [x]
            args, kwargs = _replace_hidden(args, kwargs, self._pp_hidden, key, x)
        out = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if self._pp_send_to is not None:
            if not isinstance(out, mx.array):
                raise TypeError(
                    f"layer {type(self).__mro__[2].__qualname__} returned "
                    f"{type(out).__name__}, not an array; ppwrap can only send one "
                    "hidden-state array between stages."
                )
            if stage.sends is not None and Wire.of(out) != stage.sends:
                # Checked while the graph is built: nothing has been sent yet.
                raise StageMismatchError(
                    f"rank {stage.rank} would send its hidden state as "
                    f"{Wire.of(out).describe()}, but rank {self._pp_send_to} receives "
                    f"{stage.sends.describe()} (agreed at the handshake). A layer's "
                    "output dtype changed after ppwrap.pipeline: split the model "
                    "once it is in the dtype it runs in."
                )
            if stage.ring.on:
                words = stage.ring.header if stage.ring.header is not None else stage.ring.received
                assert words is not None, "the ring is on but there are no words to send"
                sent = mx.distributed.send(
                    _with_header(out, words),
                    self._pp_send_to,
                    group=stage.group,
                    stream=stage.stream,
                )
                out = sent[..., : out.shape[-1]]
            else:
                out = mx.distributed.send(
                    out, self._pp_send_to, group=stage.group, stream=stage.stream
                )
            if out.shape[1] > 1:
                # A prompt chunk, where loops may evaluate only the caches. Not
                # while decoding: the next step would read the cache through the
                # send still in flight, and on a GPU that wait deadlocks (see
                # PipelineHead.broadcast); decode loops evaluate the output.
                for value in (*args, *kwargs.values()):
                    if _is_cache(value):
                        _chain(value, out)
        return out  # type: ignore[no-any-return]


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


class _Probe:
    """Mixed into the first and last layer of a probe run (see :func:`probe`)."""

    _pp_hidden: int
    _pp_probe_dtype: str | None = None
    _pp_probe_first = False
    _pp_probe_last = False
    _pp_probe_seen: Wire

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._pp_probe_first:
            x, key = _hidden(args, kwargs, self._pp_hidden)
            if self._pp_probe_dtype is not None:
                x = mx.zeros(x.shape, getattr(mx, self._pp_probe_dtype))
                args, kwargs = _replace_hidden(args, kwargs, self._pp_hidden, key, x)
            self._pp_probe_seen = Wire.of(x)
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
    parts: Parts, layers: list[Any], lo: int, hi: int, dtype: str | None = None
) -> tuple[Wire, Wire]:
    """What enters ``layers[lo]`` and what leaves ``layers[hi - 1]``, for one token.

    Runs the backbone lazily (nothing is computed, unless a family evaluates
    inside its forward pass) with the layers before ``lo`` passing the hidden
    state through and the run cut short after ``layers[hi - 1]``. With
    ``dtype``, ``layers[lo]`` gets zeros of that dtype instead of what came
    before, as a stage that receives its input would.
    """
    classes = [type(layer) for layer in layers[:hi]]
    ends = {id(layers[lo]): layers[lo], id(layers[hi - 1]): layers[hi - 1]}
    try:
        for layer in layers[:lo]:
            _mix(layer, _Skipped)
        for layer in ends.values():
            _mix(layer, _Probe)
        layers[lo]._pp_probe_dtype = dtype
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
            for name in ("_pp_probe_dtype", "_pp_probe_last", "_pp_probe_first", "_pp_probe_seen"):
                layer.__dict__.pop(name, None)
    if not isinstance(out, mx.array):
        raise TypeError(
            f"layer {hi - 1} of model type {parts.adapter.model_type!r} returned "
            f"{type(out).__name__}, not an array; ppwrap can only send one hidden-state "
            "array between stages."
        )
    return seen, Wire.of(out)


def stage_record(
    parts: Parts, layers: list[Any], start: int, end: int, *, first: bool
) -> dict[str, Any]:
    """What this rank tells the others at the handshake about its stage.

    The first stage: what it sends. Every other stage: the width it takes in
    and, for each dtype it may receive in, what it then produces. Which of
    those applies is only known once every rank has said what it does.
    """
    if first:
        return {"out": attrs.astuple(probe(parts, layers, 0, end)[1])}
    table = {}
    width: Wire | None = None
    for dtype in WIRE_DTYPES:
        try:
            seen, out = probe(parts, layers, start, end, dtype)
        except (ValueError, TypeError):
            continue  # a dtype this stage cannot take
        width = seen
        table[dtype] = attrs.astuple(out)
    if width is None:
        raise UnsplittableModelError(
            f"model type {parts.adapter.model_type!r}: layers {start}-{end - 1} take none of "
            f"{list(WIRE_DTYPES)} as their input."
        )
    return {"in": list(width.tail), "table": table}


def _wire(value: Any) -> Wire:
    tail, dtype = value
    return Wire(tuple(tail), dtype)


def link(records: list[dict[str, Any]]) -> list[tuple[Wire | None, Wire | None]]:
    """What each rank receives and sends, from every rank's :func:`stage_record`.

    Walks from the first stage (the last rank) to the final one: each stage
    receives what the one before it really produces.

    Raises:
        StageMismatchError: A stage produces what the next one cannot take.
    """
    size = len(records)
    wires: list[tuple[Wire | None, Wire | None]] = [(None, None)] * size
    sent = _wire(records[size - 1]["out"])
    wires[size - 1] = (None, sent)
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
        received, sent = sent, _wire(takes[sent.dtype])
        wires[r] = (received, None if r == 0 else sent)
    return wires


def local_wires(
    parts: Parts, layers: list[Any], start: int, end: int, *, rank: int, size: int
) -> tuple[Wire | None, Wire | None]:
    """What this rank receives and sends, worked out alone (no handshake).

    Runs the layers before this stage here too, lazily.
    """
    receives = probe(parts, layers, 0, start)[1] if rank < size - 1 else None
    if rank == 0:
        return receives, None
    lo, dtype = (start, receives.dtype) if receives is not None else (0, None)
    return receives, probe(parts, layers, lo, end, dtype)[1]


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
    receives = sends = None
    if size > 1:
        # Before any weight is dropped: the probes run layers lazily.
        if handshake:
            fp = fingerprint(model, parts, tuple(split), layers)
            record = stage_record(parts, layers, start, end, first=rank == size - 1)
            records = exchange(fp, group, timeout=handshake_timeout, stage=record)
            receives, sends = link(records)[rank]
        else:
            receives, sends = local_wires(parts, layers, start, end, rank=rank, size=size)
    stage = Stage(
        rank=rank,
        size=size,
        start=start,
        end=end,
        split=tuple(split),
        group=group,
        stream=default_comm_stream() if stream == "auto" else stream,
        receives=receives,
        sends=sends,
    )
    object.__setattr__(backbone, "_ppwrap_stage", stage)
    if size == 1:
        return stage

    for i, layer in enumerate(layers):
        if not start <= i < end:
            empty_weights(layer)
            _mix(layer, _Skipped)
    first, last = layers[start], layers[end - 1]
    for layer in {id(first): first, id(last): last}.values():
        layer._pp_stage = stage
        layer._pp_recv_from = rank + 1 if layer is first and not stage.is_first else None
        layer._pp_send_to = rank - 1 if layer is last and not stage.is_final else None
        if layer._pp_recv_from is not None or layer._pp_send_to is not None:
            _mix(layer, _StageEnd)

    embedding = parts.embedding
    if receives is not None and embedding is not None and not parts.adapter.embedding_everywhere:
        # Lazy: only the shape and dtype are kept, nothing is computed.
        like = embedding(mx.zeros((1, 1), dtype=mx.int32))
        embedding._pp_tail = tuple(like.shape[2:])
        embedding._pp_dtype = like.dtype
        if not ((stage.is_final or head_on_every_rank) and parts.tied):
            empty_weights(embedding)
        _mix(embedding, _ShapeOnly)
    return stage
