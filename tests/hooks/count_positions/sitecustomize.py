"""Test hook: each rank counts the positions its layers compute.

With this folder on ``PYTHONPATH`` and ``PPWRAP_TEST_COUNT_DIR`` set, every
rank of a llama or qwen2 checkpoint appends, for each input its first own layer
runs on, the number of positions to ``$PPWRAP_TEST_COUNT_DIR/rank<MLX_RANK>``
(one line each): a prefill chunk of n tokens writes n, a decode step 1.
"""

import os

_dir = os.environ.get("PPWRAP_TEST_COUNT_DIR")
if _dir:
    from mlx_lm.models import llama, qwen2

    _path = os.path.join(_dir, f"rank{os.environ.get('MLX_RANK', '0')}")
    _first: list[object] = []

    def _counted(call):  # type: ignore[no-untyped-def]
        def wrapped(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
            if not _first:
                _first.append(self)
            if self is _first[0]:
                with open(_path, "a") as f:
                    f.write(f"{x.shape[1]}\n")
            return call(self, x, *args, **kwargs)

        return wrapped

    for _family in (llama, qwen2):
        _family.TransformerBlock.__call__ = _counted(_family.TransformerBlock.__call__)
