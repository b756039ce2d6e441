"""Load only this rank's share of an mlx-lm checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from ._adapter import Adapter
from ._head import PipelineHead
from ._pipeline import drop_head, pipeline

__all__ = ["load"]


def _local_path(path_or_repo: str | Path) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; ppwrap.load takes a checkpoint folder.")
    from mlx_lm.utils import _download

    try:
        return Path(_download(str(path_or_repo)))
    except Exception as e:
        raise ValueError(
            f"{path_or_repo!r} is not a local checkpoint folder and could not be "
            f"downloaded ({type(e).__name__}: {e}). Pass the path of a folder with "
            "config.json, *.safetensors and the tokenizer files."
        ) from e


def load(
    path_or_repo: str | Path,
    *,
    group: mx.distributed.Group | None = None,
    elide_output_head: bool = True,
    split: Sequence[int] | str | None = None,
    adapter: Adapter | None = None,
    tokenizer_config: dict[str, Any] | None = None,
    handshake_timeout: float | None = 120.0,
) -> tuple[PipelineHead, Any]:
    """Load a checkpoint's local shard and wrap it, on every rank.

    The weights are read lazily through mlx-lm's own loading code (so quantized
    checkpoints and each family's ``sanitize`` work as in mlx-lm); then the
    model is split with :func:`ppwrap.pipeline`, and only what this rank uses is
    read from disk: its layers; the output head on the final rank only (with
    ``elide_output_head``); the input embedding on the first stage, and on the
    final rank when the head is tied to it.

    Args:
        path_or_repo: A local mlx-lm checkpoint folder (or a hub repository,
            where one can be reached).
        group: The ranks to split over; default ``mx.distributed.init()``.
        elide_output_head: Return hidden states on non-final ranks, which then
            never load the head.
        split: Layers per rank, indexed by rank, or ``"even"`` (the default) or
            ``"auto"`` (see :func:`ppwrap.pipeline`).
        adapter: The family adapter; default :func:`ppwrap.find_adapter`.
        tokenizer_config: Extra options for the tokenizer.
        handshake_timeout: Seconds to wait for every rank at the handshake
            (see :func:`ppwrap.pipeline`).

    Returns:
        The wrapped model and mlx-lm's tokenizer wrapper.

    Raises:
        FileNotFoundError: The folder has no config.json or no weights.
        ValueError: The checkpoint cannot be split or wrapped; the message says why.
        HandshakeError: The ranks loaded different checkpoints or splits.
    """
    from mlx_lm.utils import load_model, load_tokenizer

    model_path = _local_path(path_or_repo)
    if not (model_path / "config.json").exists():
        raise FileNotFoundError(
            f"{model_path} has no config.json; it is not an mlx-lm checkpoint folder."
        )
    group = group if group is not None else mx.distributed.init()
    model, config = load_model(model_path, lazy=True)
    # Lazy arrays know their size before anything is read.
    head_read = PipelineHead.wrap(model, adapter=adapter).head_read_bytes()
    pipeline(
        model,
        group,
        split=split,
        adapter=adapter,
        handshake_timeout=handshake_timeout,
        head_on_every_rank=not elide_output_head,
    )
    head = PipelineHead.wrap(
        model, elide_output_head=elide_output_head, adapter=adapter, group=group
    )
    head.path, head.config = model_path, config
    if elide_output_head and not head.is_final:
        drop_head(head.parts)
        head.elided_bytes = head_read
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(
        model_path, tokenizer_config, eos_token_ids=config.get("eos_token_id")
    )
    if group.size() > 1:
        # Every rank has loaded before the first step's collectives start.
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return head, tokenizer
