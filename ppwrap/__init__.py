"""ppwrap: pipeline-parallel inference with mlx-lm that runs the output head once."""

from ._batch import batch_generate_step, row_sampler
from ._generate import generate, generate_step, stream_generate
from ._head import PipelineHead
from ._load import load
from ._pipeline import Stage, pipeline
from ._version import __version__
from ._watchdog import Watchdog

# The API for running models. Writing an adapter: ``ppwrap.adapters``; the
# errors to catch: ``ppwrap.errors``.
__all__ = [
    "PipelineHead",
    "Stage",
    "Watchdog",
    "__version__",
    "batch_generate_step",
    "generate",
    "generate_step",
    "load",
    "pipeline",
    "row_sampler",
    "stream_generate",
]

# Importable from here as before this split, not part of the list above.
from ._adapter import (  # noqa: E402, F401
    Adapter,
    SharedKV,
    StageState,
    find_adapter,
    load_entry_points,
    register_adapter,
    registered_adapters,
    stop_after,
)
from .errors import (  # noqa: E402, F401
    HandshakeError,
    NonFiniteLogitsError,
    StageMismatchError,
    UnsplittableModelError,
    UnsupportedModelError,
)
