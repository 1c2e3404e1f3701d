"""The exceptions of `cliprpn batch`: what failed, and whether another attempt may help."""
from __future__ import annotations


class BatchError(Exception):
    """A job failed; ``retryable`` says whether another attempt may help."""

    def __init__(self, msg, retryable=True):
        super().__init__(msg)
        self.retryable = retryable


class BadInput(BatchError):
    """The input itself is broken (missing, empty, not an image): reported, never retried or sent."""

    def __init__(self, msg):
        super().__init__(msg, retryable=False)


class WorkflowError(ValueError):
    """The workflow cannot be used (not API format, no image input, ambiguous nodes...)."""


class ServerUnreachable(ConnectionError):
    """The server did not answer (refused, reset, timed out): the scheduler probes it and moves its work."""
