"""On every rank: pipeline each family, wrap it, and compare with the unsharded model.

Usage (on every rank): pipeline_families.py OUT_DIR STEPS SPLITTER FAMILY [FAMILY ...]

SPLITTER is ``mlx-lm`` (the backbone's own PipelineMixin ``pipeline()``),
``ppwrap`` (``ppwrap.pipeline``) or ``ppwrap-cpu`` (the same, transfers on the
CPU stream); ``SPLITTER+MIX`` first gives the models the dtypes of a mix of
``families.MIXES`` (``ppwrap+f16-f32-norms``).

For each family the rank records whether its output matched the unsharded
model's (final rank) or had the hidden-state shape (other ranks), and the same
for a greedy decode loop with a KV cache in which each rank evaluates only the
broadcast token: the stage's send must ride along with it.

With a ppwrap splitter each rank also generates greedily through
``ppwrap.stream_generate`` and records whether its tokens are those of mlx-lm's
``stream_generate`` on the unsplit model, and how many bytes the prompt cache
entries of the layers other ranks own hold afterwards (they must hold none).
"""

from __future__ import annotations

import math
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import write_result

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers import PreTrainedTokenizerFast

from families import (
    CPU_FLOAT32_ONLY,
    SPLITS,
    VARIANTS,
    build,
    cast,
    hidden_size,
    prompt,
    write_tokenizer,
)
from ppwrap import PipelineHead, pipeline, stream_generate
from ppwrap._pipeline import layer_list


PREFILL_CHUNK = 4  # the prompt is prefilled in two chunks: 4 tokens, then the rest
# Tokens per greedy generation: few, since each costs a pipelined step and an
# unsplit forward; check()'s decode loop already compares every step's logits.
GENERATE = 3


class HeadRanError(RuntimeError):
    pass


def disarm(module: Any, *, keep_call: bool) -> None:
    """Make any use of ``module`` as an output head raise on this rank."""

    def tripped(*args: Any, **kwargs: Any) -> Any:
        raise HeadRanError("the output head ran on a non-final rank")

    cls = type(module)
    members: dict[str, Any] = {"as_linear": tripped}
    if not keep_call:
        members["__call__"] = tripped
    module.__class__ = type(f"Disarmed{cls.__name__}", (cls,), members)


def close(a: mx.array, b: mx.array) -> bool:
    # Masked logits are -inf in both (phi3small); compare the finite rest.
    a, b = (mx.where(mx.isinf(t), -1e9, t) for t in (a, b))
    return bool(mx.allclose(a, b, atol=1e-4, rtol=1e-4))


def make_tokenizer(folder: Path) -> TokenizerWrapper:
    # From tokenizer.json alone: AutoTokenizer would want a config.json. It has
    # no EOS token, so every generation runs to max_tokens. Tiny models have
    # other vocabulary sizes than its 300: compare token ids, never text.
    write_tokenizer(folder)
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")))


def generated(
    model: Any, tokenizer: TokenizerWrapper, x: mx.array, steps: int, **kwargs: Any
) -> list[int]:
    """Greedy tokens from mlx-lm's stream_generate, or ppwrap's for a PipelineHead."""
    generate = stream_generate if isinstance(model, PipelineHead) else mlx_stream_generate
    return [r.token for r in generate(model, tokenizer, x[0], max_tokens=steps, **kwargs)]


def nbytes(value: Any) -> int:
    """Bytes of every array a cache holds, however nested."""
    if isinstance(value, mx.array):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return sum(nbytes(v) for v in getattr(value, "__dict__", {}).values())


@contextmanager
def cache_users(layers: list[Any], cache: list[Any]) -> Iterator[dict[int, set[int]]]:
    """Record which layers each cache entry is passed to, while in the block.

    Most families give layer i the entry cache[i], but not all (nemotron_h,
    nemotron-nas, longcat_flash_ngram): asking the layers holds for every one.
    """
    index = {id(c): n for n, c in enumerate(cache)}
    users: dict[int, set[int]] = {}
    classes = [type(layer) for layer in layers]
    for i, (layer, cls) in enumerate(zip(layers, classes, strict=True)):

        def call(self: Any, *args: Any, _i: int = i, _cls: type = cls, **kwargs: Any) -> Any:
            for value in (*args, *kwargs.values()):
                if id(value) in index:
                    users.setdefault(index[id(value)], set()).add(_i)
            return _cls.__call__(self, *args, **kwargs)

        layer.__class__ = type(cls.__name__, (cls,), {"__call__": call})
    try:
        yield users
    finally:
        for layer, cls in zip(layers, classes, strict=True):
            layer.__class__ = cls


@contextmanager
def messages() -> Iterator[dict[str, list[mx.array]]]:
    """Record each array this rank sends or receives (a template) while in the block."""
    seen: dict[str, list[mx.array]] = {"send": [], "recv_like": []}
    real = {name: getattr(mx.distributed, name) for name in seen}

    def recorder(name: str) -> Any:
        def call(x: mx.array, *args: Any, **kwargs: Any) -> Any:
            seen[name].append(x)
            return real[name](x, *args, **kwargs)

        return call

    for name in seen:
        setattr(mx.distributed, name, recorder(name))
    try:
        yield seen
    finally:
        for name, fn in real.items():
            setattr(mx.distributed, name, fn)


def reference(model: Any, x: mx.array, steps: int) -> tuple[mx.array, list[int], list[mx.array]]:
    logits = model(x)
    # The same two prefill chunks as the pipelined run: with a sliding window
    # (plamo3) or block-sparse attention (phi3small), mlx-lm's own results
    # depend on how the prompt is chunked.
    cache = make_prompt_cache(model)
    model(x[:, :PREFILL_CHUNK], cache=cache)
    out = model(x[:, PREFILL_CHUNK:], cache=cache)
    tokens, step_logits = [], []
    for _ in range(steps):
        last = out[:, -1, :]
        step_logits.append(last)
        tok = mx.argmax(last, axis=-1)
        tokens.append(tok.item())
        out = model(tok[:, None], cache=cache)
    mx.eval(logits, step_logits)
    return logits, tokens, step_logits


def split(head: PipelineHead, group: mx.distributed.Group, splitter: str, family: str) -> None:
    layers = SPLITS.get(family.partition("@")[0], {}).get(group.size())
    if splitter == "mlx-lm":
        head.parts.backbone.pipeline(group)
    elif splitter == "ppwrap":
        pipeline(head.model, group, split=layers)
    elif splitter == "ppwrap-cpu":
        pipeline(head.model, group, stream=mx.cpu, split=layers)
    else:
        raise ValueError(f"unknown splitter {splitter!r}")


def check(
    family: str,
    group: mx.distributed.Group,
    steps: int,
    splitter: str,
    tokenizer: TokenizerWrapper,
) -> dict[str, Any]:
    splitter, _, mix = splitter.partition("+")

    if mix and family in CPU_FLOAT32_ONLY and mx.default_device() == mx.cpu:
        mix = ""

    # FAMILY@VARIANT: one of families.VARIANTS' extra configs.
    base, _, variant = family.partition("@")
    overrides = VARIANTS[base][variant] if variant else {}

    def make() -> Any:
        model = build(base, **overrides)
        return cast(model, mix) if mix else model

    model = make()
    x = prompt(model)
    hidden = hidden_size(model)
    unsplit = make()
    ref_logits, ref_tokens, ref_steps = reference(unsplit, x, steps)

    head = PipelineHead.wrap(model, group=group)
    split(head, group, splitter, family)
    if not head.is_final:
        for module in head.parts.head_modules():
            disarm(module, keep_call=False)
        if head.parts.tied:
            disarm(head.parts.embedding, keep_call=True)

    result: dict[str, Any] = {"rank": head.rank, "is_final": head.is_final, "mix": mix}
    out = head(x)
    mx.eval(out)
    result["shape"] = list(out.shape)
    if head.is_final:
        finite = mx.isfinite(ref_logits)
        result["max_diff"] = mx.where(finite, mx.abs(out - ref_logits), 0).max().item()
        result["prompt_ok"] = close(out, ref_logits)
    else:
        result["prompt_ok"] = out.shape == (*x.shape, hidden)

    # Prefill in two chunks (the second one sees a cache offset); then decode,
    # every rank evaluating only the token. The first chunk evaluates only the
    # caches, as mlx-lm's generate_step does: that must still run every send.
    # On ppwrap's split it runs the backbone alone, as a caller of the mlx-lm
    # model does (the chaining must not need PipelineHead); mlx-lm's own split
    # runs through PipelineHead.
    cache = make_prompt_cache(head)
    if head.stage is not None:
        head.parts.run_backbone(x[:, :PREFILL_CHUNK], cache)
    else:
        head(x[:, :PREFILL_CHUNK], cache=cache)
    mx.eval([c.state for c in cache])
    out = head(x[:, PREFILL_CHUNK:], cache=cache)
    tokens, step_ok = [], []
    for i in range(steps):
        if head.is_final:
            last = out[:, -1, :]
            step_ok.append(close(last, ref_steps[i]))
            mine = mx.argmax(last, axis=-1).astype(mx.int32)
        else:
            mine = mx.zeros((x.shape[0],), dtype=mx.int32)
        tok = head.broadcast(mine, out)
        mx.eval(tok)
        tokens.append(tok.item())
        if i == steps - 1 and head.stage is not None:
            # The last step: what one decoded token costs each boundary.
            with messages() as sent:
                out = head(tok[:, None], cache=cache)
            result["decode_sends"] = [a.nbytes for a in sent["send"]]
            result["decode_receives"] = [a.nbytes for a in sent["recv_like"]]
            wire = head.stage.sends or head.stage.receives
            assert wire is not None
            result["hidden_bytes"] = math.prod(wire.tail) * getattr(mx, wire.dtype).size
            result["loops"] = head.stage.loops
        else:
            out = head(tok[:, None], cache=cache)
    mx.eval(out)
    result["tokens"] = tokens
    result["tokens_ok"] = tokens == ref_tokens
    result["steps_ok"] = all(step_ok)

    stage = head.stage
    if stage is None:
        return result  # mlx-lm's split: its layer list is not global
    cache = head.make_cache()
    layers = layer_list(head.parts)
    with cache_users(layers, cache) as users:
        # Both ways of waiting, whatever the machine's cores: ranks spin on 2
        # ranks and sleep on 3 (families that evaluate inside their forward
        # pass, such as dbrx, once deadlocked a sleeping rank).
        wait = "sleep" if group.size() == 3 else "spin"
        result["generated"] = generated(head, tokenizer, x, GENERATE, prompt_cache=cache, wait=wait)
    if head.is_final:
        # Only here, after the pipelined run: the other ranks go on meanwhile.
        expected = generated(unsplit, tokenizer, x, GENERATE)
        result["mlx_lm_generated"] = expected
        result["generation_ok"] = result["generated"] == expected
    # Entries only other ranks' layers use are shadows that must stay empty;
    # the own ones are measured too, to show the bytes are counted at all.
    # A source layer's cache copy (Adapter.shared_kv) holds its keys and values too.
    own = {
        n
        for n, used in users.items()
        if any(stage.start <= i < stage.end or i in stage.mirrors for i in used)
    }
    result["mirrors"] = list(stage.mirrors)
    shadows = set(users) - own
    result["cache_entries"] = len(users)
    result["own_caches"] = len(own)
    result["own_cache_bytes"] = sum(nbytes(cache[n]) for n in own)
    result["shadow_caches"] = len(shadows)
    result["shadow_cache_bytes"] = sum(nbytes(cache[n]) for n in shadows)
    return result


def main() -> None:
    out_dir, steps, splitter, families = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    group = mx.distributed.init()
    with tempfile.TemporaryDirectory(prefix="ppwrap-tokenizer-") as folder:
        tokenizer = make_tokenizer(Path(folder))
    results: dict[str, Any] = {}
    for family in families:
        try:
            results[family] = check(family, group, steps, splitter, tokenizer)
        except Exception as e:
            # The ranks may now be out of step, and messages still in flight
            # would garble the next family: stop, so the run fails fast.
            results[family] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            write_result(out_dir, group.rank(), results)
            raise
        # Written after every family, so a timeout still shows how far it got.
        write_result(out_dir, group.rank(), results)


if __name__ == "__main__":
    main()
