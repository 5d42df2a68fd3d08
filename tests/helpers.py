"""What the CLI tests share: in-process runs, tiny learnable datasets, one-line errors."""

import os
import sys
from pathlib import Path

import numpy as np
import yaml

from mlfd_cli.main import main


def run(capsys, *args):
    """Run `mlfd ARGS` in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["mlfd", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def make_npz(path, seed, classes=3, n_train=48, n_test=24, size=16, channels=1):
    """Tiny learnable data: each class is a bright square at its own position."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 40, (n, size, size, channels), dtype=np.uint8)
        for i, c in enumerate(y):
            x[i, 2 + 3 * c: 6 + 3 * c, 2:8] = 220
        return x, y.astype(np.int64)

    xtr, ytr = draw(n_train)
    xte, yte = draw(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


TINY = ["--input-size", 32, "--epochs", 1, "--batch-size", 16, "--device", "cpu",
        "--pipeline", "torch"]


def bad(capsys, *args):
    """Run a command that must fail: non-zero exit, exactly one `error:` line, no traceback."""
    code, out, err = run(capsys, *args)
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


LOCAL = ["--device", "cpu", "--pipeline", "torch"]
ARCHS = ("test_resnet", "test_vit")


def quiet(*args) -> int:
    """Run `mlfd ARGS` in-process without capsys (for fixtures); returns the exit code."""
    old = sys.argv
    sys.argv = ["mlfd", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        return e.code or 0
    finally:
        sys.argv = old
    return 0


def pin_overrides(w: Path, epochs: int = 1) -> None:
    """Write TINY's per-run overrides into experiment.yaml, so plain commands match them."""
    exp = yaml.safe_load((w / "experiment.yaml").read_text())
    for section in ("teach", "fuse", "distill"):
        exp[section]["epochs"], exp[section]["batch_size"] = epochs, 16
    (w / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))


def edit_experiment(w: Path, section: str, **values) -> None:
    """Set values in experiment.yaml: in a section ("teach", ...) or, with "", at the top."""
    exp = yaml.safe_load((w / "experiment.yaml").read_text())
    (exp[section] if section else exp).update(values)
    (w / "experiment.yaml").write_text(yaml.safe_dump(exp, sort_keys=False))


def tree_snapshot(root: Path) -> dict:
    """Every entry's mtime and every file's bytes: what a command that writes nothing keeps."""
    snap = {}
    for d, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            p = Path(d) / name
            snap[str(p.relative_to(root))] = (p.stat().st_mtime_ns,
                                              p.read_bytes() if p.is_file() else None)
    return snap
