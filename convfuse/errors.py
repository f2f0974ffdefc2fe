"""One exception family for everything convfuse refuses to do.

Ordinary unmergeable cases are *not* exceptions: they are :class:`convfuse.algebra.Decline`
values. Exceptions are for input the tool cannot work with at all (a file that is not a model,
a module in training mode, an output path that cannot be written).

An error about a file carries it in ``path`` and prints as ``PATH: MESSAGE``, so the API names
the file as the command line does (``convfuse: error: PATH: MESSAGE``).
"""

from __future__ import annotations

import os
from enum import IntEnum

__all__ = [
    "one_line",
    "ExitCode",
    "ConvfuseError",
    "InvalidModelError",
    "InvalidOptionError",
    "TrainingModeError",
    "OutputError",
    "DeviceUnavailableError",
    "VerificationError",
    "TorchFxError",
    "InternalError",
    "internal_message",
    "NotRunnableError",
    "TorchMissingError",
]


class ConvfuseError(Exception):
    """Base class: a one-line message a user can act on, and the file it is about (if any)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        return self.message if self.path is None else f"{self.path}: {self.message}"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Keep ``path`` through pickling (multiprocessing, pytest-xdist).
        return (_rebuild, (type(self), self.message, self.path))


def _rebuild(cls: type[ConvfuseError], message: str, path: str | None) -> ConvfuseError:
    return cls(message, path=path)


class InvalidModelError(ConvfuseError):
    """The input is not a model convfuse can read (missing, corrupt, fails the checker)."""


class InvalidOptionError(ConvfuseError, ValueError):
    """An option has a value convfuse does not know (a policy name); also a ``ValueError``."""


class TrainingModeError(ConvfuseError):
    """A module holding BatchNorm is in training mode: its statistics are not fixed."""


class OutputError(ConvfuseError):
    """The output cannot be written where asked (no such directory, not writable, same as input)."""


class DeviceUnavailableError(ConvfuseError):
    """A device was asked for (CUDA) that this machine does not have."""


class VerificationError(ConvfuseError):
    """A fused model does not compute what the reference computes."""


class TorchFxError(ConvfuseError):
    """torch.fx failed while convfuse rewrote a module; the message names the module's path."""


class InternalError(ConvfuseError):
    """An exception convfuse did not expect (a bug): the message is the CLI's one-line form."""


def internal_message(error: BaseException) -> str:
    """``internal error: TYPE: MESSAGE (a bug in convfuse; ...)`` on one line, as the CLI prints it."""
    return (
        f"internal error: {type(error).__name__}: {one_line(str(error), 300)} "
        "(a bug in convfuse; please report it, with CONVFUSE_TRACEBACK=1 for the traceback)"
    )


class NotRunnableError(InvalidModelError):
    """The reference model cannot be run here, so nothing can be verified against it: operators
    ONNX Runtime lacks, or no input size that every layer accepts."""


class TorchMissingError(ConvfuseError, ImportError):
    """A torch API was called where PyTorch is not installed (the ONNX path needs no torch)."""


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """A message on one line (ONNX Runtime's and protobuf's span several), cut to ``limit``."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class ExitCode(IntEnum):
    """How a command ends, one code per outcome (``convfuse merge/inspect/verify``; the library's
    :class:`~convfuse.files.MergeResult` and :class:`~convfuse.verify.VerifyResult` carry theirs)."""

    OK = 0
    #: The candidate does not compute what the reference computes; nothing written.
    VERIFY_FAILED = 1
    #: Unreadable model, unwritable output, bad usage (click uses 2 for usage errors too).
    BAD_INPUT = 2
    #: A bug in convfuse (an exception it did not expect) or out of memory; never bad input.
    INTERNAL = 3
    #: The input cannot be run here (custom operators, no size it runs at): not verified.
    UNVERIFIED = 4
    #: Ctrl-C (128 + SIGINT, as shells report it); nothing written.
    INTERRUPTED = 130
