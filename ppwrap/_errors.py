"""The errors ppwrap raises where the ranks of a pipeline disagree."""

from __future__ import annotations

__all__ = ["HandshakeError", "StageMismatchError"]


class HandshakeError(ValueError):
    """Raised on every rank when the ranks' fingerprints differ."""


class StageMismatchError(HandshakeError):
    """Raised when what one stage sends is not what the next stage receives."""
