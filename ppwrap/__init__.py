"""ppwrap: pipeline-parallel inference with mlx-lm that runs the output head once."""

from ._adapter import (
    Adapter,
    find_adapter,
    load_entry_points,
    register_adapter,
    registered_adapters,
    stop_after,
)
from ._head import PipelineHead
from ._version import __version__

__all__ = [
    "Adapter",
    "PipelineHead",
    "__version__",
    "find_adapter",
    "load_entry_points",
    "register_adapter",
    "registered_adapters",
    "stop_after",
]
