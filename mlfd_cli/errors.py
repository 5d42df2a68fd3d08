"""Errors onto exit codes: every failure ends as one line on stderr (no traceback) and
the exit code its kind documents."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from mlfd.errors import MlfdError
from mlfd_cli.app import app


class Exit(Exception):
    """Leave run() with this code, printing nothing more (an `--nproc` run's ranks did)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def run() -> None:
    """Run the app; every error ends as one line and its exit code: 0 ok, 1 internal error
    (a bug), 2 bad input or state, 3 filesystem, 4 workdir in use by another run,
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM).

    Under torchrun (or --nproc) every process runs this; see mlfd.engine.distributed."""
    from mlfd.engine import distributed
    from mlfd.engine.metrics import set_tensorboard
    from mlfd.storage.staging import Sigterm, set_read_only

    usage_errors, no_args, aborts = _click_exceptions()
    sigterm = Sigterm()  # preemption stops a run as Ctrl-C does; restored below
    # per command (tests run many in one process); under torchrun only rank 0 may finish
    # another run's promotion, as only it writes
    set_read_only(not distributed.is_main())
    set_tensorboard(False)
    try:
        if distributed.world() > 1:
            verb = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
            if verb in ("list", "export", "clean", "info"):
                raise MlfdError(f"mlfd {verb} runs in one process: start it without torchrun")
        distributed.init()
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            raise KeyboardInterrupt
        distributed.shutdown()
        sys.exit(code if isinstance(code, int) else 0)
    except Exit as e:
        sys.exit(e.code)
    except no_args as e:  # the rich help is printed while the error is made; plain is not
        if e.format_message():
            print(e.format_message())
        sys.exit(0)
    except usage_errors as e:  # usage errors: one line, like every other error
        _say(f"error: {e.format_message()}", 2)
        sys.exit(2)
    except MlfdError as e:
        _say(f"error: {e}", e.exit_code)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *aborts):
        from mlfd.storage.staging import interrupt_note

        note = interrupt_note()
        code = 143 if sigterm.terminated else 130
        # under torchrun a SIGTERM may be the launcher stopping the ranks after another one
        # failed: that rank's error is the one to show
        _say("interrupted: finished results are kept" + (f"; {note}" if note else ""), code,
             secondary=sigterm.terminated and distributed.world() > 1)
        sys.exit(code)
    except OSError as e:
        _say(f"error: {_os_error(e)}", 3)
        sys.exit(3)
    except Exception as e:  # a bug, not bad input: one line unless asked for the traceback
        if _lost_peer(e):
            _say(f"error: another process of this torchrun run failed ({_first_line(e)})", 1,
                 secondary=True)
            sys.exit(1)
        if os.environ.get("MLFD_DEBUG"):
            raise
        _say(f"internal error: {e.__class__.__name__}: {e} (set MLFD_DEBUG=1 for a traceback)",
             1)
        sys.exit(1)
    finally:
        sigterm.restore()
        # A command's read-only mode (eval, list, a dry run) ends with it: in-process
        # callers (the library's users, the tests) run the next one as themselves.
        set_read_only(False)


def _lost_peer(e: Exception) -> bool:
    """A collective that failed because another rank died: an echo of that rank's error."""
    import torch.distributed as dist

    from mlfd.engine.distributed import world

    return world() > 1 and (isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and "by peer" in str(e)))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [e.__class__.__name__])[0]


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, no-args-help, aborts) of click and of the click copy that newer typer
    releases vendor as ``typer._click``."""
    import click

    mods = [click.exceptions]
    with contextlib.suppress(ImportError):
        from typer._click import exceptions as vendored

        mods.append(vendored)
    pick = lambda name: tuple(getattr(m, name) for m in mods if hasattr(m, name))  # noqa: E731
    return pick("ClickException"), pick("NoArgsIsHelpError"), pick("Abort")


def _say(line: str, code: int, secondary: bool = False) -> None:
    """Print an error line once per run. Under `--nproc` every failing rank leaves it for
    the launcher and only rank 0 prints (unless its error only echoes a failed peer);
    under a bare torchrun every rank prints, ranks other than 0 naming themselves."""
    from mlfd.engine import distributed as dist

    folder = os.environ.get(dist.ERRORS_ENV)
    if dist.world() > 1 and folder:
        with contextlib.suppress(OSError):
            Path(folder, f"rank-{dist.rank()}.json").write_text(json.dumps(
                {"rank": dist.rank(), "code": code, "line": line, "secondary": secondary}))
        if dist.rank() > 0 or secondary:
            return
    elif dist.rank() > 0:
        line = f"[rank {dist.rank()}] {line}"
    print(line, file=sys.stderr)


def _os_error(e: OSError) -> str:
    """The filesystem's refusal in one line, naming the path."""
    from mlfd.storage.diskio import describe

    return describe(e)
