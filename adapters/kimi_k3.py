"""kimi_k3: the attention-residual blocks cross stage boundaries with the hidden state."""

from typing import Any

import mlx.core as mx
from mlx_lm.models.kimi_k3 import ResidualBlocks

from ppwrap._adapter import Adapter, register_adapter


def encode(blocks: Any) -> Any:
    # raw stacks one partial sum per finished block: (blocks, batch, length, hidden).
    if blocks is None or blocks.raw is None:
        return None
    return mx.moveaxis(blocks.raw, 0, 2)


def decode(raw: Any, local: Any) -> Any:
    if raw is None:
        return local
    blocks = ResidualBlocks(local.eps if local is not None else 0.0)
    for block in mx.moveaxis(raw, 2, 0):
        blocks.append(block)  # recomputes each block's norm exactly as the sender did
    return blocks


register_adapter(
    Adapter(
        model_type="kimi_k3",
        # layer(h, mask=, cache=, blocks=) returns (h, blocks).
        carries=("blocks",),
        carry_codec=(encode, decode),
        traffic=(
            "the attention-residual blocks finished so far: one hidden-sized partial "
            "sum per attn_res_block_size layers before the boundary"
        ),
    )
)
