"""User-facing errors.

Anything a user can get wrong (a bad config value, a missing file, a model that cannot be
downloaded) raises :class:`DiffDistillError` with one line that says what is wrong, where, and how to
fix it. The CLI prints that line without a traceback (``--debug`` shows it) and exits non-zero.
"""


class DiffDistillError(Exception):
    """An error the user can fix; its message is one self-contained line."""


class ConfigError(DiffDistillError):
    """A config file or ``key=value`` override is invalid."""


class DataError(DiffDistillError):
    """A dataset is missing, empty, corrupt or does not fit the model."""


class ModelLoadError(DiffDistillError):
    """Model weights could not be found or loaded."""
