"""A rank's place in a pipeline, and the messages between stages.

A stage message is the hidden state a stage hands the next one, with what the
decode loop's ring adds to it (the token and a flag, see :class:`Ring`) and
whatever a family's layers hand on besides (``ppwrap._carry``): one array, so
that one send and one receive carry it whatever it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn

from . import _carry as carry

__all__ = [
    "HEADER_WORDS",
    "Message",
    "Ring",
    "Stage",
    "Wire",
    "default_comm_stream",
    "kv_from_wire",
    "kv_to_wire",
    "receive_ahead",
    "recv_message",
    "send_message",
    "split_header",
    "stage_of",
    "with_header",
    "zero_kv",
]


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
    # While the ring is on, each receive as it comes off the wire (before any
    # unpacking), in the order the forward passes built them: a decode loop
    # clears it before each step and may wait for the first on its own.
    wire_in: list[mx.array] = attrs.field(factory=list, eq=False, repr=False)
    # A prompt chunk's send that the sending layer's own cache could not take:
    # the backbone chains it into another entry of the prompt cache.
    unchained: list[mx.array] = attrs.field(factory=list, eq=False, repr=False)

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


def with_header(x: mx.array, words: mx.array) -> mx.array:
    """``x`` with ``words`` (uint32) bit-cast to its dtype and appended on its last axis.

    ``words`` is one row's ``(HEADER_WORDS,)``, the same for every sequence of
    the batch, or ``(B, HEADER_WORDS)``, one row per sequence.
    """
    batch, length = x.shape[0], x.shape[1]
    words = mx.broadcast_to(words.astype(mx.uint32), (batch, words.shape[-1]))
    cells = mx.view(mx.contiguous(words), x.dtype)
    cells = mx.broadcast_to(cells[:, None, :], (batch, length, cells.shape[-1]))
    return mx.concatenate([x, cells], axis=-1)


def split_header(message: mx.array) -> tuple[mx.array, mx.array]:
    """The hidden state and the words, ``(B, HEADER_WORDS)``, of a message from
    :func:`with_header`."""
    width = HEADER_WORDS * 4 // message.itemsize
    cells = message[:, 0, -width:].reshape(message.shape[0], width)
    return message[..., :-width], mx.view(cells, mx.uint32)


def kv_to_wire(a: mx.array) -> mx.array:
    """Keys or values ``(batch, heads, length, dim)`` as ``(batch, length, heads, dim)``."""
    return mx.moveaxis(a, 2, 1)


def kv_from_wire(a: mx.array) -> mx.array:
    return mx.moveaxis(a, 1, 2)


def zero_kv(wires: tuple[Wire, Wire], lead: Sequence[int]) -> tuple[mx.array, mx.array]:
    """Stand-in keys and values of a shared-KV source (never evaluated)."""
    return kv_from_wire(wires[0].zeros(lead)), kv_from_wire(wires[1].zeros(lead))


@attrs.define
class Message:
    """One received stage message, unpacked."""

    hidden: mx.array
    carried: tuple[Any, ...]
    kv: dict[int, tuple[mx.array, mx.array]]
    state: list[mx.array]


def recv_message(
    stage: Stage,
    source: int,
    wire: Wire | None,
    lead: Sequence[int],
    state: Sequence[carry.Part] = (),
) -> Message:
    """Receive a stage message: the hidden state (in the shape and dtype the
    previous stage really sends, agreed at the handshake, not this rank's own
    guess from its embedding), what the layers carry, shared keys and values,
    and the family's other state (``Adapter.state``, in ``state``'s parts)."""
    assert wire is not None, "a receiving stage has no agreed wire"
    template = wire.zeros(lead)
    if stage.ring.on:
        template = with_header(template, mx.zeros((HEADER_WORDS,), mx.uint32))
    forms = stage.carry_in or ()
    kv_wires = [w for s in stage.kv_in for w in stage.kv_wires[s]]
    extra = [carry.part_of(w, lead) for w in [*carry.wires(forms), *kv_wires]]
    if extra or state:
        # One message: the hidden state and the rest, as bytes.
        layout = [(tuple(template.shape), template.dtype), *extra, *state]
        message = mx.distributed.recv_like(
            carry.packed_zeros(layout), source, group=stage.group, stream=stage.stream
        )
        if stage.ring.on:
            stage.wire_in.append(message)
        x, *arrays = carry.unpack(message, layout)
    else:
        x = mx.distributed.recv_like(template, source, group=stage.group, stream=stage.stream)
        if stage.ring.on:
            stage.wire_in.append(x)
        arrays = []
    given = arrays[len(arrays) - len(state) :] if state else []
    arrays = arrays[: len(arrays) - len(state)]
    if stage.ring.on:
        x, stage.ring.received = split_header(x)
    stage.received[:] = [x]
    count = len(carry.wires(forms))
    carried = carry.rebuild(forms, arrays[:count])
    kvs = [kv_from_wire(a) for a in arrays[count:]]
    kv = {s: (kvs[2 * i], kvs[2 * i + 1]) for i, s in enumerate(stage.kv_in)}
    stage.kv_now.update(kv)
    return Message(x, carried, kv, given)


def receive_ahead(stage: Stage, lead: Sequence[int]) -> mx.array:
    """Take this rank's next stage message now, before its forward pass, and
    return the control words it carries (the ring must be on).

    A decode loop on a rank after the first learns each token only from the
    stage message; families that embed the token on every rank
    (``Adapter.embedding_everywhere``) need it before their layers run. The
    forward pass then takes the message from ``stage.inbox``.
    """
    assert stage.ring.on, "only ring messages carry words"
    stage.inbox.append(recv_message(stage, stage.rank + 1, stage.receives, lead))
    return cast("mx.array", stage.ring.received)


def send_message(
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
        message = with_header(hidden, words)
    else:
        message = hidden
    arrays = carry.leaves(carried)
    arrays += [kv_to_wire(a) for s in stage.kv_out for a in stage.kv_now[s]]
    arrays += state
    if arrays:
        packed = carry.pack([message, *arrays])
        sent = mx.distributed.send(packed, to, group=stage.group, stream=stage.stream)
        return cast("mx.array", mx.depends(hidden, sent))
    sent = mx.distributed.send(message, to, group=stage.group, stream=stage.stream)
    return sent[..., :width] if stage.ring.on else sent
