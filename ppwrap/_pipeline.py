"""Split any mlx-lm decoder into pipeline stages, in place.

The backbone's own ``__call__`` keeps running unchanged; only its layers change
class (``ppwrap._roles``):

- layers another rank owns pass the hidden state through, their weights
  dropped; their caches still advance (by zero-width updates) so that masks a
  backbone builds from any layer's cache see the right offset;
- the first local layer receives the stage message from the previous stage;
- the last local layer sends it on to the next stage (all but the final rank).

Global layer indices never change, so checkpoints load as they are and every
per-layer rule a family has (sliding windows, hybrid layers, mask indices) sees
the layer it expects. Unlike mlx-lm's ``PipelineMixin`` there is no
``all_gather`` of the hidden state at the end: the final rank has all it needs,
and decode loops hand the token round the ring (``ppwrap._generate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from ._adapter import Adapter, Parts, resolve
from ._errors import UnsplittableModelError
from ._handshake import fingerprint
from ._handshake import handshake as exchange
from ._probe import Links, link, local_wires, probe_closure, probe_kv, stage_record
from ._roles import (
    Backbone,
    KVMirror,
    KVSource,
    LoopBack,
    ShapeOnly,
    Skipped,
    StageEnd,
    mix,
    stage_alone,
)
from ._stage import (
    HEADER_WORDS,
    Ring,
    Stage,
    Wire,
    default_comm_stream,
    receive_ahead,
    stage_of,
)

__all__ = [
    "HEADER_WORDS",
    "Ring",
    "Stage",
    "Wire",
    "default_comm_stream",
    "even_split",
    "link",
    "pipeline",
    "receive_ahead",
    "stage_alone",
    "stage_of",
    "stage_record",
]


LAYER_NAMES = ("layers", "h", "blocks")


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
    # Each source layer, with the layers that read its keys and values.
    read_by = {s: [r for r in readers if readers[r] == s] for s in sorted(set(readers.values()))}
    sources = list(read_by)
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
        return tuple(s for s in sources if s < boundary and max(read_by[s]) >= boundary)

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
            s for s in sources if not start <= s < end and any(start <= r < end for r in read_by[s])
        ),
        kv_wires=kv_wires,
        owner=backbone,
        embeds_everywhere=bool(everywhere),
    )
    object.__setattr__(backbone, "_ppwrap_stage", stage)
    if size == 1:
        return stage
    mix(backbone, Backbone)

    for i, layer in enumerate(layers):
        if not start <= i < end:
            empty_weights(layer)
            mix(layer, KVMirror if i in stage.mirrors else Skipped)
            if i < start and links.carry_in is not None:
                object.__setattr__(layer, "_pp_placeholder", links.carry_in)
        elif i in stage.kv_out:
            mix(layer, KVSource)  # inside StageEnd: keeps them before a send
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
            mix(layer, StageEnd)
    if loops > 1:
        layers[0]._pp_stage = stage
        if stage.is_final:
            mix(layers[0], LoopBack)

    embedding = parts.embedding
    if receives is not None and embedding is not None and not stage.embeds_everywhere:
        # Lazy: only the shape and dtype are kept, nothing is computed.
        like = embedding(mx.zeros((1, 1), dtype=mx.int32))
        embedding._pp_tail = tuple(like.shape[2:])
        embedding._pp_dtype = like.dtype
        if not ((stage.is_final or head_on_every_rank) and parts.tied):
            empty_weights(embedding)
        mix(embedding, ShapeOnly)
    return stage
