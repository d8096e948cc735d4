"""The errors a user fixes: every entry point prints their one-line message and exits with status 2."""

from __future__ import annotations

import pickle


class ConfigError(ValueError):
    """A config file or override the user has to fix; the message says what and how."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the config says; the message names the path and the fix."""


class UnreadableDataError(ValueError):
    """An unreadable training image met with ``data.on_corrupt="error"``; the message names the file and the fix."""


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used (damaged, truncated, not a checkpoint); names the file."""


class UnsafeWeightsError(CheckpointError, pickle.UnpicklingError):
    """A .pt/.pth file that pickles objects other than tensors and plain containers: never unpickled here."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (full disk, quota, I/O error); its ``.tmp`` was removed, older ones are intact."""


class WorkdirBusyError(RuntimeError):
    """Another live run holds the working directory's lock."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights (VAE, CLIP) are neither on disk nor reachable; the message says how to provide them."""


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The FID Inception weights are not on disk; the message says where to download them and where to put them."""


class JobMismatchError(ValueError):
    """An existing job (parts or final file) was made with other settings than the ones asked for now."""


class CorruptImageError(OSError):
    """An unreadable image met while extracting with ``on_corrupt="error"``; the message names the file."""
