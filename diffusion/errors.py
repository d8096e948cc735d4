"""The errors a user fixes: every entry point prints their one-line message and exits with status 2.

Each one is a :class:`UserError` (what the command line catches) and keeps the builtin base it had before
(``ValueError``, ``FileNotFoundError``, ``OSError``, ...), so callers that catch those still do.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Something the user fixes (a flag, a config value, a path, a file): the message says what and how."""


class ConfigError(UserError, ValueError):
    """A config file, override or flag the user has to fix; the message says what and how."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder named on the command line or in the config is not there (a checkpoint, a prompts file, a
    samples file, a reference); the message names the path."""


class InputError(UserError, ValueError):
    """A file that is there but does not hold what the command needs (no images, other feature dimensions, too few
    samples for a metric); the message names the file and what it holds."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are not where the config says; the message names the path and the fix."""


class UnreadableDataError(UserError, ValueError):
    """An unreadable training image met with ``data.on_corrupt="error"``; the message names the file and the fix."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or weights file that cannot be used (damaged, truncated, not a checkpoint); names the file."""


class UnsafeWeightsError(CheckpointError, pickle.UnpicklingError):
    """A .pt/.pth file that pickles objects other than tensors and plain containers: never unpickled here."""


class CheckpointSaveError(UserError, OSError):
    """Writing a checkpoint failed (full disk, quota, I/O error); its ``.tmp`` was removed, older ones are intact."""


class WorkdirBusyError(UserError, RuntimeError):
    """Another live run holds the working directory's lock."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step, the last checkpoint and the fixes."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Pretrained weights (VAE, CLIP) are neither on disk nor reachable; the message says how to provide them."""


class InceptionWeightsNotFoundError(UserError, FileNotFoundError):
    """The FID Inception weights are not on disk; the message says where to download them and where to put them."""


class JobMismatchError(UserError, ValueError):
    """An existing job (parts or final file) was made with other settings than the ones asked for now."""


class CorruptImageError(UserError, OSError):
    """An unreadable image (extraction with ``on_corrupt="error"``, an evaluation folder); names the file."""


class FileAccessError(UserError, OSError):
    """A file or folder the user named cannot be read or written (no permission, no space, not a folder)."""


@contextmanager
def user_files() -> Iterator[None]:
    """Work whose every OS error concerns files the user named (eval_fid.py's samples, reference, caches and
    outputs): such an error becomes a FileAccessError with the system's message."""
    try:
        yield
    except UserError:
        raise
    except OSError as err:
        raise FileAccessError(str(err)) from err
