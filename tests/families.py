"""Tiny random-weight models of real mlx-lm families, for the tests.

Each family has a tiny config in ``tests/configs/<family>.json``, written like
the ``config.json`` of a real checkpoint, so the same file builds a model here
and a checkpoint folder in the loading tests.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.models

CONFIGS = Path(__file__).parent / "configs"
MODELS_DIR = Path(mlx_lm.models.__file__).parent


def _defines_model(path: Path) -> bool:
    # Parse instead of importing: some family modules exit on import when an
    # optional package is missing.
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {"Model", "ModelArgs"} <= names


def installed_families() -> list[str]:
    """Every ``mlx_lm/models/<family>.py`` of the installed mlx-lm with a ``Model``."""
    return sorted(
        p.stem
        for p in MODELS_DIR.glob("*.py")
        if not p.stem.startswith("_") and _defines_model(p)
    )


def pipeline_families() -> list[str]:
    """The families whose backbone carries mlx-lm's ``PipelineMixin``."""
    return [
        f
        for f in installed_families()
        if "PipelineMixin" in (MODELS_DIR / f"{f}.py").read_text()
    ]


def tiny_config(family: str, **overrides: Any) -> dict[str, Any]:
    path = CONFIGS / f"{family}.json"
    config: dict[str, Any] = json.loads(path.read_text())
    config.update(overrides)
    return config


def build(family: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-weight model of ``family``, the same on every call and rank."""
    from mlx_lm.utils import _get_classes

    config = tiny_config(family, **overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def config_int(model: nn.Module, key: str) -> int:
    """An integer from the model's config (or its text_config)."""
    args = getattr(model, "args", None) or getattr(model, "config", None)
    for holder in (args, getattr(args, "text_config", None)):
        if isinstance(holder, dict):
            value = holder.get(key)
        else:
            value = getattr(holder, key, None)
        if value:
            return int(value)
    raise AssertionError(f"no {key} in the config of {type(model)}")


def vocab_size(model: nn.Module) -> int:
    return config_int(model, "vocab_size")


def hidden_size(model: nn.Module) -> int:
    return config_int(model, "hidden_size")


def prompt(model: nn.Module, length: int = 7, *, seed: int = 1) -> mx.array:
    """A deterministic prompt of token ids inside the model's vocabulary."""
    key = mx.random.key(seed)
    return mx.random.randint(0, min(vocab_size(model), 100), (1, length), key=key)


def write_checkpoint(family: str, path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``family`` model as an mlx-lm checkpoint folder."""
    from mlx_lm.utils import save_config, save_model

    model = build(family, seed=seed, **overrides)
    save_model(path, model)
    save_config(tiny_config(family, **overrides), path / "config.json")
    return path
