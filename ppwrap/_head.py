"""PipelineHead: run the output head only on the pipeline rank that uses it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ._adapter import Adapter, Parts, resolve
from ._pace import Pace
from ._pipeline import Stage, default_comm_stream, nbytes, stage_alone, stage_of

__all__ = ["PipelineHead"]


class PipelineHead:
    """A wrapped mlx-lm model that returns logits only on the final pipeline rank.

    mlx-lm's pipeline convention puts the last layers on rank 0, so rank 0 is
    the final stage. Every other rank returns the backbone's hidden states,
    which still carry that rank's send and gather, so evaluating what a rank
    returns runs its share of the pipeline's communication.

    Build one with :meth:`wrap`.
    """

    __slots__ = (
        "_group",
        "_paces",
        "_parts",
        "config",
        "elide_output_head",
        "elided_bytes",
        "model",
        "path",
    )

    def __init__(
        self,
        model: nn.Module,
        parts: Parts,
        *,
        elide_output_head: bool,
        group: mx.distributed.Group | None,
    ) -> None:
        self.model = model
        self.elide_output_head = elide_output_head
        self._parts = parts
        self._group = group
        #: Bytes of head weights this rank does not read per token (set by load).
        self.elided_bytes = 0
        #: The checkpoint's folder (a hub id resolved to its local copy) and its
        #: config.json, set by :func:`ppwrap.load`: the one place the rest of
        #: ppwrap reads the checkpoint's settings from.
        self.path: Path | None = None
        self.config: dict[str, Any] | None = None
        self._paces: dict[str, Pace] = {}

    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        *,
        elide_output_head: bool = True,
        adapter: Adapter | None = None,
        group: mx.distributed.Group | None = None,
    ) -> PipelineHead:
        """Wrap an mlx-lm ``Model``.

        Call it after ``model.model.pipeline(group)`` (or :func:`ppwrap.pipeline`)
        or before: the rank is read from the backbone at every call.

        Args:
            model: Any mlx-lm ``Model``.
            elide_output_head: Skip the final head on non-final ranks, which
                then return hidden states. ``False`` keeps mlx-lm's behaviour
                (logits on every rank).
            adapter: The family adapter; default :func:`ppwrap.find_adapter`.
            group: The group the pipeline runs over, for :meth:`broadcast`;
                default the global group.

        Returns:
            The wrapper.

        Raises:
            TypeError: ``model`` is already a ``PipelineHead`` or not a module.
            ValueError: The backbone or head cannot be found.
        """
        if isinstance(model, PipelineHead):
            raise TypeError(
                "PipelineHead.wrap got a PipelineHead; wrap the mlx-lm model once "
                "(the wrapped model is head.model)."
            )
        parts = resolve(model, adapter)
        return cls(model, parts, elide_output_head=elide_output_head, group=group)

    @property
    def adapter(self) -> Adapter:
        """The adapter the parts were found with."""
        return self._parts.adapter

    @property
    def parts(self) -> Parts:
        """The resolved text model, backbone, head and embedding."""
        return self._parts

    @property
    def stage(self) -> Stage | None:
        """This rank's stage, if the model was split by :func:`ppwrap.pipeline`."""
        return stage_of(self._parts.backbone)

    @property
    def rank(self) -> int:
        """This process's pipeline rank (0 holds the last layers)."""
        stage = self.stage
        if stage is not None:
            return stage.rank
        # mlx-lm's PipelineMixin keeps its rank on the backbone.
        return int(getattr(self._parts.backbone, "pipeline_rank", 0))

    @property
    def size(self) -> int:
        """The number of pipeline stages."""
        stage = self.stage
        if stage is not None:
            return stage.size
        return int(getattr(self._parts.backbone, "pipeline_size", 1))

    @property
    def is_final(self) -> bool:
        """Whether this rank runs the last layers and returns logits."""
        return self.rank == 0

    @property
    def returns_logits(self) -> bool:
        """Whether :meth:`__call__` returns logits on this rank."""
        return self.is_final or not self.elide_output_head

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size from the model's config, or ``None`` if it has none."""
        for place in (self.config, (self.config or {}).get("text_config")):
            if isinstance(place, dict) and isinstance(place.get("vocab_size"), int):
                return int(place["vocab_size"])
        for holder in (self.model, self._parts.text_model):
            args = getattr(holder, "args", None) or getattr(holder, "config", None)
            for place in (args, getattr(args, "text_config", None)):
                value = (
                    place.get("vocab_size")
                    if isinstance(place, dict)
                    else getattr(place, "vocab_size", None)
                )
                if isinstance(value, int):
                    return value
        return None

    @property
    def layers(self) -> Any:
        """The model's layers as mlx-lm's cache helpers see them (local ones)."""
        return self.model.layers

    def make_cache(self, max_kv_size: int | None = None) -> list[Any]:
        """The prompt cache, as mlx-lm's ``make_prompt_cache`` builds it for the model.

        After :func:`ppwrap.pipeline` it still has one entry per global layer
        (backbones zip their layers with it), but only this rank's layers fill
        theirs: the others only count tokens and hold no arrays.
        """
        from mlx_lm.models.cache import make_prompt_cache

        cache: list[Any] = make_prompt_cache(self.model, max_kv_size=max_kv_size)
        return cache

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        """Run the backbone, then the head where it is used.

        Args:
            inputs: Token ids ``(B, L)``, as for the wrapped model.
            cache: The prompt cache, as for the wrapped model.
            **kwargs: Passed to the backbone (``input_embeddings`` and the like).

        Returns:
            Logits ``(B, L, vocab)`` on the final rank (and on every rank when
            ``elide_output_head`` is false); the normed hidden states
            ``(B, L, hidden)`` elsewhere.
        """
        hidden = self._backbone(inputs, cache, kwargs)
        if not self.returns_logits:
            return hidden
        return self._parts.project(hidden)

    def hidden_states(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        """Run the backbone only, on every rank: for prompt chunks whose logits
        nobody reads. Evaluate the result (it carries this rank's send)."""
        return self._backbone(inputs, cache, kwargs)

    def _backbone(self, inputs: mx.array, cache: Any, kwargs: dict[str, Any]) -> mx.array:
        _check_inputs(inputs, kwargs)
        hidden: mx.array = self._parts.run_backbone(inputs, cache, **kwargs)
        return hidden

    def project(self, hidden: mx.array) -> mx.array:
        """Apply the output head (and its transforms) to final hidden states."""
        return self._parts.project(hidden)

    def stage_seconds(self, rows: int = 1, steps: int = 5) -> float:
        """Seconds this rank's own part of a decode step takes, measured alone.

        Runs this rank's layers (and the head on the final rank, the embedding
        on the first) on ``rows`` sequences of one token, without its peers,
        after a short prefill; the median of ``steps`` steps. Every rank can
        call it at any time: it sends and receives nothing.
        """
        cache = self.make_cache()
        times = []
        with stage_alone():
            mx.eval(self(mx.zeros((rows, 16), mx.uint32), cache=cache))
            step = mx.zeros((rows, 1), mx.uint32)
            for _ in range(steps + 1):
                tic = time.perf_counter()
                mx.eval(self(step, cache=cache))
                times.append(time.perf_counter() - tic)
        return sorted(times[1:])[steps // 2]

    def _pace(self, wait: str) -> Pace:
        """This rank's record of one kind of wait (see ``generate_step``'s ``wait``)."""
        return self._paces.setdefault(wait, Pace())

    def broadcast(self, tokens: mx.array, out: mx.array) -> mx.array:
        """Send the final rank's ``tokens`` to every rank, after this rank's stage.

        Every rank calls it with an array of the same shape and dtype: the final
        rank with the tokens it sampled, the others with anything (zeros). The
        collective depends on ``out``, what :meth:`__call__` returned here, so
        evaluating the result also runs this rank's send: a rank that entered
        the broadcast before its send would leave the pipeline waiting forever.

        Args:
            tokens: The sampled tokens on the final rank; a placeholder elsewhere.
            out: What this rank's call returned this step.

        Returns:
            The final rank's tokens, on every rank.
        """
        if self.size == 1:
            return tokens
        mine = tokens if self.is_final else mx.zeros_like(tokens)
        mine = mx.depends(mine, out)
        summed = mx.distributed.all_sum(mine, group=self.group, stream=self.comm_stream)
        # The collective runs on the CPU stream on every backend. A copy on
        # this step's own stream makes the next step's GPU work wait for it
        # in this step's evaluation, on the host: on MLX CUDA, GPU work that
        # reads a collective still in flight from an earlier evaluation waits
        # in a GPU kernel that can deadlock the device (and on Metal a GPU
        # command buffer that waits too long is killed).
        return summed + 0

    @property
    def comm_stream(self) -> Any:
        """The stream this rank's pipeline communication runs on."""
        stage = self.stage
        return stage.stream if stage is not None else default_comm_stream()

    @property
    def group(self) -> mx.distributed.Group:
        """The group the pipeline runs over."""
        if self._group is not None:
            return self._group
        stage = self.stage
        return stage.group if stage is not None else mx.distributed.init()

    def resident_bytes(self) -> int:
        """Bytes of the parameters this rank holds (dropped weights count 0)."""
        return nbytes(self.model)

    def head_read_bytes(self) -> int:
        """Bytes of weights one head projection reads (the tied embedding's when tied)."""
        if self._parts.tied and self._parts.embedding is not None:
            return nbytes(self._parts.embedding)
        return self.head_bytes()

    def head_bytes(self) -> int:
        """Bytes of the parameters only the output head uses (0 for a tied head)."""
        arrays: list[mx.array] = [getattr(o, n) for o, n in self._parts.head_arrays()]
        return sum(nbytes(m) for m in self._parts.head_modules()) + sum(a.nbytes for a in arrays)

    def __repr__(self) -> str:
        return (
            f"PipelineHead({self.adapter.model_type}, rank={self.rank}, "
            f"size={self.size}, elide_output_head={self.elide_output_head})"
        )


def _check_inputs(inputs: Any, kwargs: dict[str, Any]) -> None:
    # A bad input on one rank must fail before any communication starts.
    if not isinstance(inputs, mx.array):
        raise TypeError(f"inputs must be an mx.array of token ids; got {type(inputs).__name__}.")
    if kwargs.get("input_embeddings") is not None:
        return
    if inputs.ndim != 2:
        raise ValueError(
            f"inputs must have shape (batch, length); got shape {tuple(inputs.shape)}. "
            "Add a batch axis: inputs[None]."
        )
    if not mx.issubdtype(inputs.dtype, mx.integer):
        raise ValueError(f"inputs must hold integer token ids; got dtype {inputs.dtype}.")
