"""Adapters: where a family keeps its backbone, final norm and output head.

Most mlx-lm families share one shape (``Model.model`` runs embedding, layers and
final norm; ``Model.lm_head`` or the tied embedding projects to the vocabulary),
so the generic discovery in :func:`resolve` handles them with no adapter at all.
An adapter only states what differs for its family.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

import attrs
import mlx.core as mx
import mlx.nn as nn

from ._errors import UnsupportedModelError

__all__ = [
    "Adapter",
    "Parts",
    "SharedKV",
    "StageState",
    "adapter_for",
    "find_adapter",
    "family_of",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "resolve",
    "stop_after",
]

logger = logging.getLogger("ppwrap")

ENTRY_POINT_GROUP = "ppwrap.adapters"

# Where the generic discovery looks, in order.
BACKBONE_NAMES = ("model", "transformer", "backbone")
HEAD_NAMES = ("lm_head", "output")
EMBEDDING_NAMES = (
    "embed_tokens",
    "wte",
    "word_embeddings",
    "tok_embeddings",
    "embeddings",
    "embedding",
    "token_embeddings",
    "embed_in",
)

Transform = Callable[[nn.Module, mx.array], mx.array]
BackboneCall = Callable[..., mx.array]


@attrs.frozen(kw_only=True)
class SharedKV:
    """Layers that attend with the keys and values of an earlier layer.

    The rank that runs a source layer sends each call's new keys and values on
    with the hidden state (only the new positions); a rank that runs a layer
    reading them keeps its own copy of the source's cache, filled from those.

    Attributes:
        readers: ``readers(backbone)`` gives ``{reader layer: source layer}``,
            global layer indices.
        returns: What a layer another rank owns returns, for layers that
            return more than the hidden state: ``returns(hidden, kv, offset)``
            where ``kv`` is the source's ``(keys, values)`` from this rank's
            copy (``None`` for other layers) and ``offset`` that cache's offset
            before them (``None`` without a cache). Default: the hidden state.
        new_kv: A source's new ``(keys, values)`` from its output, for a call
            without a cache (with one, ppwrap takes what the layer adds to it).
    """

    readers: Callable[[nn.Module], dict[int, int]]
    returns: Callable[[mx.array, Any, Any], Any] | None = None
    new_kv: Callable[[Any], Any] | None = None


@attrs.frozen(kw_only=True)
class StageState:
    """State a family's layers share outside their calls' values, which a stage
    boundary must carry too (deepseek_v41's dict of compressed keys, index keys
    and top-k indices that later layers read).

    Each function gets the backbone, ``boundary`` (the global index of the
    first layer after the boundary) and the call arguments of the layer at the
    boundary: the sending rank's last layer, or the receiving rank's first.

    Attributes:
        layout: ``layout(backbone, boundary, args, kwargs)`` gives the parts
            this call's message carries, as ``(shape, dtype)``; they may depend
            on the position (the cache offset), never on values.
        give: ``give(backbone, boundary, args, kwargs)`` gives the arrays, in
            ``layout``'s order, after the sending rank's last layer ran.
        take: ``take(backbone, boundary, args, kwargs, arrays)`` puts them
            where the layers read them, before the receiving rank's first layer
            runs, and returns its call arguments.
    """

    layout: Callable[..., list[tuple[tuple[int, ...], mx.Dtype]]]
    give: Callable[..., list[mx.array]]
    take: Callable[..., tuple[tuple[Any, ...], dict[str, Any]]]


@attrs.frozen(kw_only=True)
class Adapter:
    """How to find the parts of one model family.

    Every field but ``model_type`` is optional: a field left as ``None`` is
    found by the generic discovery. Paths are dotted attribute paths.

    Attributes:
        model_type: The family: the name of its ``mlx_lm.models`` module, or
            the ``model_type`` of a family that lives outside mlx-lm.
        text_model: Path from the ``Model`` to the module that runs the
            backbone and then the head. Vision-language wrappers use
            ``"language_model"``; ``""`` is the model itself.
        backbone: Path from the text model to the backbone: the module that
            embeds, runs the layers (and any pipeline communication) and applies
            the final norm.
        head: Path from the text model to the output projection module. A
            family whose head is tied to its input embedding has none.
        embedding: Path from the backbone to the input embedding.
        tied: Decides from the text model whether the head is the tied input
            embedding. Default: tied exactly when there is no head module.
        project: Replaces the whole projection: ``project(text_model, hidden)``
            returns logits. Use it when the head is not a plain module call;
            the ``head`` module (if any) still counts as the head's weights.
        transform: Applied to the logits after the projection:
            ``transform(text_model, logits)``. Soft-capping, logit scaling, casts.
        layers: Path from the backbone to its list of layers, for
            :func:`ppwrap.pipeline`; default the first of ``layers``, ``h``,
            ``blocks``. ``"a+b"``: the backbone runs list ``a``, then ``b``.
        hidden_arg: Position of the hidden state among a layer's positional
            arguments (0 for nearly every family).
        carries: For layers that return a tuple, the hidden state first: the
            arguments of the next layer's call (positions or keywords) that the
            tuple's other elements feed, in order. A stage boundary carries
            them with the hidden state (rwkv7's ``v_first``: ``(1,)``).
        carry_codec: For carried values that are not arrays: ``(encode,
            decode)``; ``encode(value)`` gives ``None``, an array or a tuple of
            arrays, each ``(batch, length, ...)``; ``decode(encoded, local)``
            rebuilds the value on the receiving rank, where ``local`` is what
            its own backbone passed.
        hidden_codec: For a hidden state whose leading axes are not
            ``(batch, length)``: ``(encode, decode)``; ``encode(hidden)`` gives
            the ``(batch, length, width)`` array a boundary carries,
            ``decode(encoded, local)`` rebuilds it, ``local`` being this rank's
            own hidden state at that point (for its shape).
        shared_kv: Layers that read an earlier layer's keys and values
            (:class:`SharedKV`).
        state: What a boundary carries besides the layers' calls' values
            (:class:`StageState`).
        advance: For a cache class ppwrap does not know:
            ``advance(cache, length, batch)`` moves it as if ``length`` tokens
            went in, on a rank that does not run its layer (``False``: do what
            ppwrap does for unknown caches, which moves ``offset``).
        loops: Attribute of the backbone: how many times it runs its whole
            layer list per token (the layers keep their weights; each run has
            its own caches). Between runs the final rank hands the first stage
            the next run's input.
        traffic: What a stage boundary carries per decoded token besides the
            hidden state, for the support table (``ppwrap families``).
        head_extras: Paths from the text model to more weights only the head
            uses, modules or bare arrays: a head kept as a bare weight array,
            a learned gain after it. They count as head weights, and ranks
            that elide the head never read them.
        embedding_everywhere: Every layer reads the input embedding, so every
            rank computes it (and keeps its weights); or a function of the
            backbone that says whether this model does.
        unsplittable: Why :func:`ppwrap.pipeline` cannot split this family
            (it raises this reason); ``None`` when it can.
        unsupported: Why ppwrap cannot wrap this family at all (wrapping
            raises this reason); ``None`` when it can.
        layer_call: For layers without a call of their own (a backbone that
            runs their parts inline): ``layer_call(layer, *args, **kwargs)``
            runs one. ppwrap gives each layer this call, and the adapter's
            ``call_backbone`` calls the layers, so that they can be split.
        call_backbone: Replaces the backbone call:
            ``call_backbone(backbone, inputs, cache, **kwargs)`` returns the
            normed hidden states. Use it when the backbone's own ``__call__``
            also applies the head, or takes its arguments in another order.
    """

    model_type: str
    text_model: str = ""
    backbone: str | None = None
    head: str | None = None
    embedding: str | None = None
    tied: Callable[[nn.Module], bool] | None = None
    project: Transform | None = None
    transform: Transform | None = None
    layers: str | None = None
    hidden_arg: int = 0
    carries: tuple[int | str, ...] = ()
    carry_codec: tuple[Callable[[Any], Any], Callable[[Any, Any], Any]] | None = None
    hidden_codec: tuple[Callable[[Any], Any], Callable[[Any, Any], Any]] | None = None
    shared_kv: SharedKV | None = None
    state: StageState | None = None
    advance: Callable[[Any, int, int], bool] | None = None
    loops: str | None = None
    traffic: str | None = None
    head_extras: tuple[str, ...] = ()
    embedding_everywhere: bool | Callable[[nn.Module], bool] = False
    unsplittable: str | None = None
    unsupported: str | None = None
    layer_call: Callable[..., Any] | None = None
    call_backbone: BackboneCall | None = None


@attrs.frozen
class Parts:
    """The resolved parts of one model, as :class:`PipelineHead` uses them.

    Attributes:
        adapter: The adapter the parts were resolved with.
        text_model: The module whose backbone and head ppwrap runs.
        backbone: The backbone module.
        head: The output projection module, or ``None`` when the head is tied
            to the input embedding (or is no module). With ``adapter.project``
            it is not called, but still counts as the head's weights.
        embedding: The input embedding, or ``None`` if none was found (only
            allowed when the head does not use it).
        extras: The adapter's ``head_extras``, as (owner module, attribute name).
    """

    adapter: Adapter
    text_model: nn.Module
    backbone: nn.Module
    head: nn.Module | None
    embedding: nn.Module | None
    extras: tuple[tuple[nn.Module, str], ...] = ()

    @property
    def tied(self) -> bool:
        """Whether the final rank may need the input embedding for the head."""
        return self.head is None and not self.extras

    def run_backbone(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        call = self.adapter.call_backbone
        if call is None:
            return self.backbone(inputs, cache=cache, **kwargs)  # type: ignore[no-any-return]
        backbone = self.backbone
        # A split backbone chains its sends into the cache after the run
        # (ppwrap._roles.Backbone), however the adapter runs it.
        if (run := getattr(backbone, "_ppwrap_run", None)) is not None:
            return run(lambda: call(backbone, inputs, cache, **kwargs), cache)  # type: ignore[no-any-return]
        return call(backbone, inputs, cache, **kwargs)

    def project(self, hidden: mx.array) -> mx.array:
        adapter = self.adapter
        if adapter.project is not None:
            out = adapter.project(self.text_model, hidden)
        elif self.head is not None:
            out = self.head(hidden)
        else:
            assert self.embedding is not None
            out = self.embedding.as_linear(hidden)
        if adapter.transform is not None:
            out = adapter.transform(self.text_model, out)
        return out

    def head_modules(self) -> list[nn.Module]:
        """The modules only the head uses (not the tied embedding)."""
        extras = [getattr(owner, name) for owner, name in self.extras]
        modules = [self.head] if self.head is not None else []
        return modules + [m for m in extras if isinstance(m, nn.Module)]

    def head_arrays(self) -> list[tuple[nn.Module, str]]:
        """Bare weight arrays only the head uses, as (owner module, attribute name)."""
        return [(o, n) for o, n in self.extras if isinstance(getattr(o, n), mx.array)]


class _Stopped(Exception):
    def __init__(self, value: mx.array) -> None:
        self.value = value


class _StopAfter(nn.Module):  # type: ignore[misc]  # mlx.nn is untyped for mypy
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        raise _Stopped(self.inner(*args, **kwargs))


def stop_after(path: str) -> BackboneCall:
    """A ``call_backbone`` that returns the output of the submodule at ``path``.

    For backbones whose own ``__call__`` applies the head after the final norm:
    ``stop_after("norm")`` runs the backbone until its norm returns and hands
    back the normed hidden states, so the head is never called.

    Args:
        path: Dotted path from the backbone to the module whose output is the
            backbone's result (usually the final norm).
    """
    parent_path, _, name = path.rpartition(".")

    def call_backbone(
        backbone: nn.Module, inputs: mx.array, cache: Any = None, **kwargs: Any
    ) -> mx.array:
        parent = _get(backbone, parent_path)
        inner = getattr(parent, name)
        setattr(parent, name, _StopAfter(inner))
        try:
            backbone(inputs, cache=cache, **kwargs)
        except _Stopped as stopped:
            return stopped.value
        finally:
            setattr(parent, name, inner)
        raise ValueError(
            f"The backbone {type(backbone).__qualname__} returned without calling "
            f"{path!r}; the adapter's stop_after path is wrong."
        )

    return call_backbone


_registry: dict[str, tuple[Adapter, str]] = {}
_entry_points_loaded = False


def _origin(fn: object) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if name else module


def _add(adapter: Adapter, origin: str, override: bool) -> Adapter:
    known = _registry.get(adapter.model_type)
    if known is not None and not override:
        raise ValueError(
            f"An adapter for model type {adapter.model_type!r} is already "
            f"registered (from {known[1]}); the new one comes from {origin}. "
            "Pass override=True to replace it on purpose."
        )
    _registry[adapter.model_type] = (adapter, origin)
    return adapter


F = TypeVar("F", bound=Transform)


@overload
def register_adapter(adapter: Adapter, /, *, override: bool = ...) -> Adapter: ...


@overload
def register_adapter(
    model_type: str, /, *, override: bool = ..., **fields: Any
) -> Callable[[F], F]: ...


def register_adapter(
    adapter_or_type: Adapter | str, /, *, override: bool = False, **fields: Any
) -> Adapter | Callable[[F], F]:
    """Register an adapter for one model family.

    Two forms. With an :class:`Adapter`, registers it and returns it::

        register_adapter(Adapter(model_type="dbrx", backbone="transformer"))

    With a model type, returns a decorator that registers the decorated
    function as the family's logit ``transform`` (other fields by keyword)::

        @register_adapter("gemma2")
        def softcap(text_model, logits):
            cap = text_model.final_logit_softcapping
            return mx.tanh(logits / cap) * cap

    Args:
        adapter_or_type: An adapter, or the model type to build one for.
        override: Replace an adapter already registered for the same type.
        **fields: More :class:`Adapter` fields, with the decorator form.

    Returns:
        The adapter, or the decorator.

    Raises:
        ValueError: An adapter for that model type is already registered and
            ``override`` is false.
        TypeError: ``fields`` were given together with an ``Adapter``.
    """
    if isinstance(adapter_or_type, Adapter):
        if fields:
            raise TypeError(
                "register_adapter(Adapter(...)) takes no other fields; found "
                f"{sorted(fields)}. Set them on the Adapter instead."
            )
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        return _add(adapter_or_type, caller, override)

    model_type = adapter_or_type

    def decorate(fn: F) -> F:
        _add(Adapter(model_type=model_type, transform=fn, **fields), _origin(fn), override)
        return fn

    return decorate


def load_entry_points() -> int:
    """Load the adapters that installed packages publish.

    A package publishes adapters through the entry-point group
    ``ppwrap.adapters``; each entry point names a module (or object) whose
    import registers them. Runs once; later calls load nothing.

    Returns:
        How many entry points were loaded by this call.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return 0
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    loaded = 0
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception:
            logger.exception("ppwrap: could not load adapter entry point %r", ep.name)
            continue
        loaded += 1
    return loaded


def registered_adapters() -> dict[str, Adapter]:
    """All registered adapters, by model type (built-in and from entry points)."""
    _load_builtin()
    load_entry_points()
    return {k: v[0] for k, v in sorted(_registry.items())}


def _load_builtin() -> None:
    # Importing registers them. The package lives in adapters/ (pyproject maps it).
    import ppwrap.adapters  # type: ignore[import-not-found]  # noqa: F401


def family_of(model: nn.Module) -> str:
    """The family of an mlx-lm model: its ``mlx_lm.models`` module name.

    Falls back to ``model_type`` for models defined outside mlx-lm, since
    mlx-lm maps several model types (``mistral``, ``kimi_k2``) onto one module.
    """
    module = type(model).__module__
    if module.startswith("mlx_lm.models."):
        return module.rsplit(".", 1)[1]
    model_type = getattr(model, "model_type", None)
    if not isinstance(model_type, str):
        model_type = getattr(getattr(model, "args", None), "model_type", None)
    return model_type if isinstance(model_type, str) else type(model).__name__


def adapter_for(model_type: str) -> Adapter | None:
    """The registered adapter for ``model_type``, or ``None``."""
    _load_builtin()
    load_entry_points()
    found = _registry.get(model_type)
    return found[0] if found else None


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``: its family's registered one, else the generic one.

    Args:
        model: An mlx-lm ``Model`` (or any module shaped like one).

    Returns:
        The registered adapter for the model's family, or ``Adapter(model_type=...)``
        whose fields are all left to the generic discovery.
    """
    family = family_of(model)
    names = [family]
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    if isinstance(model_type, str) and model_type != family:
        names.append(model_type)
    for name in names:
        found = adapter_for(name)
        if found is not None:
            return found
    return Adapter(model_type=family)


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name)
    return obj


def _child(module: nn.Module, names: Iterable[str]) -> tuple[str, nn.Module] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, nn.Module):
            return name, value
    return None


def _how_to_fix(family: str) -> str:
    return (
        "Register an adapter that names it, for example "
        f"register_adapter(Adapter(model_type={family!r}, backbone=..., head=...)); "
        "see docs/adapters.md."
    )


def _children(module: nn.Module) -> list[str]:
    return sorted(k for k, v in module.items() if isinstance(v, (nn.Module, list)))


def resolve(model: nn.Module, adapter: Adapter | None = None) -> Parts:
    """Find the text model, backbone, head and embedding of ``model``.

    Args:
        model: An mlx-lm ``Model``.
        adapter: The adapter to use; default :func:`find_adapter`.

    Returns:
        The resolved :class:`Parts`.

    Raises:
        TypeError: ``model`` is not an ``mlx.nn.Module``.
        ValueError: A part cannot be found: the message names what was looked
            for, what the model has, and how to register an adapter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"PipelineHead wraps an mlx.nn.Module (an mlx-lm Model); got "
            f"{type(model).__module__}.{type(model).__qualname__}."
        )
    adapter = adapter if adapter is not None else find_adapter(model)
    family = adapter.model_type
    if adapter.unsupported:
        raise UnsupportedModelError(
            f"ppwrap cannot wrap model type {family!r}: {adapter.unsupported}"
        )

    try:
        text_model = _get(model, adapter.text_model)
    except AttributeError:
        raise UnsupportedModelError(
            f"Model type {family!r}: the adapter's text_model path "
            f"{adapter.text_model!r} does not exist on {type(model).__qualname__} "
            f"(its children: {_children(model)}). {_how_to_fix(family)}"
        ) from None
    # Vision-language wrappers delegate to a complete text model.
    while not adapter.text_model and _child(text_model, ["language_model"]):
        inner = text_model.language_model
        if _child(inner, BACKBONE_NAMES) is None:
            break
        text_model = inner

    if adapter.backbone is not None:
        backbone = _get(text_model, adapter.backbone)
    else:
        found = _child(text_model, BACKBONE_NAMES)
        if found is None:
            raise UnsupportedModelError(
                f"Model type {family!r}: cannot find the backbone. Looked for a "
                f"module named one of {list(BACKBONE_NAMES)} on "
                f"{type(text_model).__qualname__}; it has {_children(text_model)}. "
                f"{_how_to_fix(family)}"
            )
        backbone = found[1]

    if adapter.embedding is not None:
        embedding = _get(backbone, adapter.embedding)
    else:
        found = _child(backbone, EMBEDDING_NAMES)
        embedding = found[1] if found else None

    head: nn.Module | None = None
    if adapter.head is not None:
        head = _get(text_model, adapter.head)
    else:
        found = _child(text_model, HEAD_NAMES)
        head = found[1] if found else None
    if adapter.tied is not None and adapter.tied(text_model):
        head = None
    if head is None and adapter.project is None and not hasattr(embedding, "as_linear"):
        raise UnsupportedModelError(
            f"Model type {family!r}: cannot find the output head. Looked for "
            f"a module named one of {list(HEAD_NAMES)} on "
            f"{type(text_model).__qualname__} (it has {_children(text_model)}) "
            f"and, for a tied head, an embedding with as_linear named one of "
            f"{list(EMBEDDING_NAMES)} on {type(backbone).__qualname__} (it has "
            f"{_children(backbone)}). {_how_to_fix(family)}"
        )
    extras = []
    for path in adapter.head_extras:
        owner_path, _, name = path.rpartition(".")
        owner = _get(text_model, owner_path) if owner_path else text_model
        if not isinstance(getattr(owner, name, None), (nn.Module, mx.array)):
            raise UnsupportedModelError(
                f"Model type {family!r}: the adapter's head_extras path {path!r} is "
                f"not a module or an array on {type(text_model).__qualname__}. "
                f"{_how_to_fix(family)}"
            )
        extras.append((owner, name))
    if adapter.layer_call is not None:
        _give_calls(backbone, adapter)
    return Parts(adapter, text_model, backbone, head, embedding, tuple(extras))


class _Called:
    """The base of a layer that has no call of its own (``Adapter.layer_call``)."""

    _pp_layer_call: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._pp_layer_call(self, *args, **kwargs)


def _give_calls(backbone: nn.Module, adapter: Adapter) -> None:
    from ._roles import mix

    # Innermost, before any of ppwrap.pipeline's roles: those call it as the layer's own.
    for layer in getattr(backbone, adapter.layers or "layers"):
        if not isinstance(layer, _Called):
            mix(layer, _Called)
            object.__setattr__(layer, "_pp_layer_call", adapter.layer_call)
