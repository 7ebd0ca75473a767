"""Errors a user can cause. Jobs print `str(err)` as one line and exit non-zero."""


class ZooselectError(Exception):
    """Base for every error caused by input or environment, not by a bug."""


class ConfigError(ZooselectError, ValueError):
    """A configuration value, catalog entry or command-line option is invalid."""


class DataError(ZooselectError, ValueError):
    """A task or probe dataset is missing, empty, unreadable or malformed."""


class ModelError(ZooselectError):
    """A model could not be created, loaded or run."""


class ClusterError(ZooselectError):
    """The Ray cluster could not be reached, or is not a Ray cluster."""


class StoreError(ZooselectError):
    """The embedding store could not be reached, read or written."""


class ObjectGoneError(StoreError):
    """An object to read is not there (never written, or deleted since it was listed)."""


class CorruptObjectError(StoreError):
    """An object that is there but cannot be parsed (truncated, overwritten, not Parquet)."""


class StandardMismatchError(ZooselectError):
    """Embeddings of different standards, schema versions or widths would be mixed."""


def brief(value: object, width: int = 80) -> str:
    """`repr(value)` on one line (a numpy array's rows, a dataclass holding one, joined), cut to `width`
    characters: for an error that names what it received in one line."""
    return " ".join(repr(value).split())[:width]
