"""The errors ppwrap raises: models it cannot take, and ranks that disagree.

All are ``ValueError`` subclasses, so code that caught ``ValueError`` before
still does.
"""

from __future__ import annotations

__all__ = [
    "HandshakeError",
    "StageMismatchError",
    "UnsplittableModelError",
    "UnsupportedModelError",
]


class UnsupportedModelError(ValueError):
    """Raised when ppwrap cannot wrap a model's family: no output head or
    backbone where its adapter looks, or an adapter that says it is unsupported."""


class UnsplittableModelError(ValueError):
    """Raised when ``ppwrap.pipeline`` cannot split a model's layers over ranks
    (its adapter says why, or its layer list is not where it looks)."""


class HandshakeError(ValueError):
    """Raised on every rank when the ranks' fingerprints differ."""


class StageMismatchError(HandshakeError):
    """Raised when what one stage sends is not what the next stage receives."""
