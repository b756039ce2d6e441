"""The interim demo: a custom decode loop on local ranks over a tiny random model.

Run by ``ppwrap demo`` on every rank (under ``mlx.launch``). The model is a
qwen2-shaped network with random weights: its tokens mean nothing, but every
rank shows what PipelineHead returns there.
"""

from __future__ import annotations

import sys

import mlx.core as mx
from mlx_lm.models import qwen2

from ppwrap import PipelineHead

CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 1024,
    "tie_word_embeddings": False,
}


def main(steps: int = 8) -> None:
    group = mx.distributed.init()
    mx.random.seed(0)  # the same random weights on every rank
    model = qwen2.Model(qwen2.ModelArgs.from_dict(CONFIG))
    model.model.pipeline(group)
    head = PipelineHead.wrap(model, group=group)

    def say(msg: str) -> None:
        # One write per line, so the ranks' lines do not interleave.
        sys.stdout.write(f"[rank {head.rank}] {msg}\n")
        sys.stdout.flush()

    cache = head.make_cache()
    x = mx.array([[1, 2, 3, 4, 5]])
    tokens = []
    for _ in range(steps):
        out = head(x, cache=cache)
        last = out[:, -1, :]
        mine = mx.argmax(last, axis=-1) if head.is_final else mx.zeros((1,), mx.uint32)
        token = head.broadcast(mine, out)  # carries this rank's send with it
        mx.eval(token)
        tokens.append(token.item())
        x = token[:, None]
    kind = "logits" if head.returns_logits else "hidden states"
    say(f"layers {len(head.layers)}, returns {kind} of shape {tuple(out.shape)}")
    if head.is_final:
        say(f"argmax tokens (random weights, no meaning): {tokens}")
    else:
        say(f"skipped the output head ({head.head_bytes() / 1e3:.0f} kB of weights)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
