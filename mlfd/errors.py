"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class MlfdError(Exception):
    """Bad input or state a user can fix (missing file, stale cache, impossible option)."""

    exit_code = 2


class DatasetNotFound(MlfdError):
    pass


class StaleCacheError(MlfdError):
    pass
