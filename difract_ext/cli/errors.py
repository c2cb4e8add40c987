"""How ``difract`` answers an error: one line for what a user can cause, a traceback for bugs."""

from __future__ import annotations

__all__ = ["error_line", "foreseen"]

#: Error classes a user can cause (bad values, files, paths, devices, memory): one line, no
#: traceback. ValueError covers ConfigError, CheckpointError, HarvestFormatError, BadFileError,
#: JSON and Unicode errors; OSError covers missing, unreadable and unwritable paths, a full disk
#: and a port in use. Matched by name: safetensors' and torch's errors (no import here).
_FORESEEN = (ValueError, OSError, NotImplementedError, MemoryError, ImportError)
_FORESEEN_NAMES = ("SafetensorError", "OutOfMemoryError")


def foreseen(err: BaseException) -> bool:
    """Whether ``difract`` answers ``err`` with one line (else: a traceback, it is a bug)."""
    return isinstance(err, _FORESEEN) or type(err).__name__ in _FORESEEN_NAMES


def error_line(err: BaseException) -> str:
    """``err`` as one line (its class named where the message alone is unclear)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    if not isinstance(err, ValueError) or type(err).__name__ == "JSONDecodeError":
        text = f"{text} ({type(err).__name__})"
    return f"{text} (--debug shows the traceback)"
