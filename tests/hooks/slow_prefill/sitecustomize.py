"""Test hook: one rank's prefill chunks take long, as on a slow host.

With this folder on ``PYTHONPATH`` and ``PPWRAP_TEST_SLOW_PREFILL=RANK:SECONDS``,
the rank ``RANK`` of a llama or qwen2 checkpoint spends about ``SECONDS`` more
in the first layer it runs for every input of more than 32 positions (prefill
chunks, not decode steps nor the server's 16-token warm-up). The extra work is
real computation inside the evaluated graph, added times zero, so outputs are
unchanged.
"""

import os

_spec = os.environ.get("PPWRAP_TEST_SLOW_PREFILL", "")
if _spec and os.environ.get("MLX_RANK") == _spec.split(":")[0]:
    import time

    import mlx.core as mx
    from mlx_lm.models import llama, qwen2

    _seconds = float(_spec.split(":")[1])
    _first: list[object] = []
    _rounds: list[int] = []

    def _busy_work(x: mx.array) -> mx.array:
        w = mx.random.normal((512, 512)) * 0.04
        if not _rounds:  # how many products make the time, on this machine
            mx.eval(w)
            tic = time.perf_counter()
            mx.eval(mx.tanh(w @ w))
            _rounds.append(max(1, int(_seconds / max(time.perf_counter() - tic, 1e-4))))
        acc = w
        for _ in range(_rounds[0]):
            acc = mx.tanh(acc @ w)
        return x + 0 * acc.sum().astype(x.dtype)

    def _slowed(call):  # type: ignore[no-untyped-def]
        def wrapped(self, x, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = call(self, x, *args, **kwargs)
            if not _first:
                _first.append(self)
            if self is _first[0] and x.shape[1] > 32:
                out = _busy_work(out)
            return out

        return wrapped

    for _family in (llama, qwen2):
        _family.TransformerBlock.__call__ = _slowed(_family.TransformerBlock.__call__)
