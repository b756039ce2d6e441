"""Built-in adapters, one module per mlx-lm family that differs from the common shape.

Importing this package registers them all. Families with the common shape
(``Model.model`` backbone, ``lm_head`` or tied embedding, nothing after it)
need no module here. The API for writing one is re-exported here.
"""

import importlib
import pkgutil

from ppwrap._adapter import (
    Adapter,
    SharedKV,
    StageState,
    find_adapter,
    load_entry_points,
    register_adapter,
    registered_adapters,
    stop_after,
)

__all__ = [
    "Adapter",
    "SharedKV",
    "StageState",
    "find_adapter",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "stop_after",
]

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
