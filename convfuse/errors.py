"""One exception family for everything convfuse refuses to do.

Ordinary unmergeable cases are *not* exceptions: they are :class:`convfuse.algebra.Decline`
values. Exceptions are for input the tool cannot work with at all (a file that is not a model,
a module in training mode, an output path that cannot be written).
"""

from __future__ import annotations

__all__ = [
    "ConvfuseError",
    "InvalidModelError",
    "TrainingModeError",
    "OutputError",
    "DeviceUnavailableError",
    "VerificationError",
]


class ConvfuseError(Exception):
    """Base class: a one-line message a user can act on."""


class InvalidModelError(ConvfuseError):
    """The input is not a model convfuse can read (missing, corrupt, fails the checker)."""


class TrainingModeError(ConvfuseError):
    """A module holding BatchNorm is in training mode: its statistics are not fixed."""


class OutputError(ConvfuseError):
    """The output cannot be written where asked (no such directory, not writable, same as input)."""


class DeviceUnavailableError(ConvfuseError):
    """A device was asked for (CUDA) that this machine does not have."""


class VerificationError(ConvfuseError):
    """A fused model does not compute what the reference computes."""
