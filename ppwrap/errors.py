"""The errors ppwrap raises, for callers that catch them by type."""

from ._errors import (
    HandshakeError,
    StageMismatchError,
    UnsplittableModelError,
    UnsupportedModelError,
)
from ._generate import NonFiniteLogitsError

__all__ = [
    "HandshakeError",
    "NonFiniteLogitsError",
    "StageMismatchError",
    "UnsplittableModelError",
    "UnsupportedModelError",
]
