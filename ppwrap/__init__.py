"""ppwrap: pipeline-parallel inference with mlx-lm that runs the output head once."""

from ._adapter import (
    Adapter,
    find_adapter,
    load_entry_points,
    register_adapter,
    registered_adapters,
    stop_after,
)
from ._batch import batch_generate_step, row_sampler
from ._errors import (
    HandshakeError,
    StageMismatchError,
    UnsplittableModelError,
    UnsupportedModelError,
)
from ._generate import NonFiniteLogitsError, generate, generate_step, stream_generate
from ._head import PipelineHead
from ._load import load
from ._pipeline import Stage, pipeline
from ._version import __version__
from ._watchdog import Watchdog

__all__ = [
    "Adapter",
    "HandshakeError",
    "NonFiniteLogitsError",
    "PipelineHead",
    "Stage",
    "StageMismatchError",
    "UnsplittableModelError",
    "UnsupportedModelError",
    "Watchdog",
    "__version__",
    "batch_generate_step",
    "find_adapter",
    "generate",
    "generate_step",
    "load",
    "load_entry_points",
    "pipeline",
    "register_adapter",
    "registered_adapters",
    "row_sampler",
    "stop_after",
    "stream_generate",
]
