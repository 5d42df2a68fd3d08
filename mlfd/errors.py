"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class MlfdError(Exception):
    """Bad input or state a user can fix (missing file, stale cache, impossible option)."""

    exit_code = 2


class DatasetNotFound(MlfdError):
    pass


class StaleCacheError(MlfdError):
    pass


class WorkdirBusy(MlfdError):
    """Another mlfd process holds the workdir's lock."""

    exit_code = 4


class FilesystemError(MlfdError):
    """The filesystem refused: not a directory, read-only, no space, permission."""

    exit_code = 3


class CorruptArtifact(MlfdError):
    """A stored result whose files are damaged (checksum mismatch, unreadable metadata)."""
