"""The `mlfd` command: maps options onto the stage functions of mlfd.stages.

The entry point of `mlfd`, `python -m mlfd_cli.main` and `torchrun -m mlfd_cli.main`."""

from __future__ import annotations

# importing the verb modules registers their verbs with the app
from mlfd_cli import compare, housekeeping, predict, report, train  # noqa: F401
from mlfd_cli.errors import run


def main() -> None:
    """Exit codes: 0 ok, 1 internal error (a bug), 2 bad input or state, 3 filesystem,
    4 workdir in use by another run, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    run()


if __name__ == "__main__":
    main()
