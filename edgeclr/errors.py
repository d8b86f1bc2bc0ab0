"""Errors that are the user's to fix. Torch-free: the runtime and the CLI import this module.

Every one subclasses `EdgeclrError`; the CLI prints its message as one line and exits with code 2.
Each class also keeps the built-in base it always had (ValueError, RuntimeError, OSError), so
`except ValueError` in a user's code still catches a bad image or config.
"""

from __future__ import annotations


class EdgeclrError(Exception):
    """A problem with the user's input, files or options: the message names it and the fix."""


class ConfigError(EdgeclrError, ValueError):
    """A config value or file that cannot be used."""


class DataError(EdgeclrError, ValueError):
    """A dataset that cannot be used: the message names the problem and the fix."""


class ImageError(EdgeclrError, ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


class ModelError(EdgeclrError, ValueError):
    """An exported model file that cannot be used (missing, unknown format, no edgeclr metadata)."""


class CheckpointError(EdgeclrError, ValueError):
    """A checkpoint that cannot be used: the message names the file, the problem and the fix."""


class OutputError(EdgeclrError, OSError):
    """The output folder cannot be written: raised before a stage does any work."""


class NonFiniteLoss(EdgeclrError, RuntimeError):
    """The loss became NaN or infinite: the run stops; the last good checkpoint is kept."""


class ExportError(EdgeclrError, RuntimeError):
    """An export that failed its checks: nothing was written as done."""


class CompressError(EdgeclrError, RuntimeError):
    """A compression step that failed its checks or its budget: nothing was written as done."""


class BenchError(EdgeclrError, RuntimeError):
    """A model that cannot be benchmarked as asked (missing runtime, wrong kind of file)."""
