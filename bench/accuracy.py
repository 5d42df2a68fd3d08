"""Accuracy over seeds as a results file: a thin caller of `mlfd compare`.

It maps its options onto `mlfd compare` (run in this process), which trains and evaluates
every model of the paper's comparison in one workdir per seed (teachers, joint teachers
and students at every asked level, the multi-head and joint-head baselines of every
student's architecture) and writes reports/compare.{json,md,png}. The JSON and Markdown
are then copied to accuracy-<preset>[-holdout<F>][-tag]-<date>.{json,md}, with the
machine, the versions, the date, the command and the experiment that ran added.

Where things go (nothing enters the checkout unless asked):

* workdirs: --root (default $XDG_CACHE_HOME/mlfd/bench-accuracy, else
  ~/.cache/mlfd/bench-accuracy), one per variant: <root>/<preset>[-holdout<F>][-tag]. Its
  experiment.yaml is rewritten from the command on every run; the seeds' stages check
  their own fingerprints, so finished seeds and models are reused and a changed value
  retrains only what it affects. An interrupted run continues where it stopped.
* results: --out DIR (or --out FILE.json; default <root>/results); --save writes them
  to bench/results/ in the checkout.

    python bench/accuracy.py --preset demo --seeds 0 1 2 --levels 1 2 --save
    python bench/accuracy.py --preset trio --data-root ../shared/data --seeds 0 1 2 --save

Choosing a recipe happens on a validation split held out of train, never on the test split:

    python bench/accuracy.py --preset trio --data-root ../shared/data --holdout 0.1 \\
        --seeds 0 --no-baselines --tag equal-steps --set datasets.animal-mnist.teach.epochs=12

Your own data (a custom experiment); anything after `--` goes to `mlfd compare` as is:

    python bench/accuracy.py --teacher a.npz=test_resnet --teacher b.npz=test_resnet \\
        --tag mine -- --input-size 32 --pipeline torch
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def default_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mlfd" / "bench-accuracy"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line, as the mlfd CLI does
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse(argv: list[str]) -> argparse.Namespace:
    """The bench's options; what follows `--` is passed to `mlfd compare` unchanged."""
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = _Parser(prog="bench/accuracy.py", description=__doc__.splitlines()[0],
                 epilog="Arguments after `--` go to `mlfd compare` unchanged (e.g. -- "
                        "--epochs 2 --pipeline torch).")
    ap.add_argument("--preset", default=None, help="demo | trio | paper-t1 | paper-t2 "
                    "(default: demo, unless --teacher defines the experiment)")
    ap.add_argument("--teacher", action="append", default=[], metavar="DATASET=ARCH",
                    help="a custom experiment, as `mlfd compare --teacher` (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--baselines", choices=("same-arch", "all", "none"), default="same-arch",
                    help="which multi-dataset baselines each dataset meets (default: those "
                         "of its own architecture)")
    ap.add_argument("--no-baselines", dest="baselines", action="store_const", const="none",
                    help="the same as --baselines none")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--holdout", type=float, default=None,
                    help="measure on this fraction held out of train, not on the test split "
                         "(for choosing a recipe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the experiment (repeatable): distill.epochs=4, "
                         "datasets.NAME.teach.epochs=12")
    ap.add_argument("--tag", default="", help="names this variant's workdir and results")
    ap.add_argument("--root", type=Path, default=None,
                    help=f"where the workdirs live (default: {default_root()})")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="results directory, or a .json file (the .md beside it); "
                            "default <root>/results")
    where.add_argument("--save", action="store_true",
                       help="write the results into the checkout's bench/results/")
    args = ap.parse_args(argv)
    args.extra = extra
    if args.preset is None and not args.teacher:
        args.preset = "demo"
    args.root = (args.root or default_root()).expanduser()
    return args


def name_of(args) -> str:
    """The variant: what its workdir and results are called."""
    return (args.preset or "custom") + \
        (f"-holdout{args.holdout:g}" if args.holdout else "") + \
        (f"-{args.tag}" if args.tag else "")


def outputs(args, name: str, today: str) -> tuple[Path, Path]:
    """The results' JSON and Markdown paths."""
    if args.out is not None and args.out.suffix == ".json":
        out = args.out
    else:
        folder = RESULTS if args.save else args.out if args.out is not None \
            else args.root / "results"
        out = folder / f"accuracy-{name}-{today}.json"
    return out, out.with_suffix(".md")


def compare_argv(args, workdir: Path) -> list[str]:
    """The bench's options as `mlfd compare` arguments."""
    cmd = ["compare", "--workdir", str(workdir), "--seeds", *map(str, args.seeds),
           "--levels", *map(str, args.levels), "--baselines", args.baselines,
           "--device", args.device]
    if args.preset is not None:
        cmd += ["--preset", args.preset]
    for t in args.teacher:
        cmd += ["--teacher", t]
    if args.data_root is not None:
        cmd += ["--data-root", args.data_root]
    if args.holdout is not None:
        cmd += ["--holdout", f"{args.holdout:g}"]
    for s in args.set:
        cmd += ["--set", s]
    return cmd + args.extra


def mlfd(argv: list[str]) -> int:
    """Run `mlfd ARGV` in this process; its exit code (its error, if any, already printed)."""
    from mlfd_cli.main import main

    old = sys.argv
    sys.argv = ["mlfd", *argv]
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


def environment(summary: str) -> tuple[dict, dict]:
    """The machine and the versions a table was measured with."""
    import timm
    import torch
    import zarr

    import mlfd
    from mlfd.info import cpu_model

    machine = {"summary": summary, "cpu": cpu_model(), "cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "platform": platform.platform()}
    versions = {"mlfd": mlfd.__version__, "torch": torch.__version__,
                "timm": timm.__version__, "zarr": zarr.__version__,
                "python": platform.python_version()}
    return machine, versions


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    name = name_of(args)
    today = dt.date.today().isoformat()
    workdir = args.root / name
    # The command is the recipe: the file of an earlier run (another --set, a preset since
    # changed) would otherwise win over it; the stages' fingerprints decide what reruns.
    (workdir / "experiment.yaml").unlink(missing_ok=True)
    cmd = compare_argv(args, workdir)
    t0 = time.perf_counter()
    code = mlfd(cmd)
    if code:
        raise SystemExit(code)
    wall = time.perf_counter() - t0

    from mlfd.config import Experiment

    reports = workdir / "reports"
    doc = json.loads((reports / "compare.json").read_text())
    experiment = Experiment.load(workdir / "experiment.yaml").to_dict()
    experiment.pop("seed")  # each seed's own: see per_seed
    machine, versions = environment(doc.pop("machine"))
    doc = {"name": name, "preset": args.preset, "teachers": args.teacher, "tag": args.tag,
           "holdout": args.holdout or 0.0, "set": args.set, "date": today,
           "command": shlex.join(["python", "bench/accuracy.py", *argv]),
           "compare_command": shlex.join(["mlfd", *cmd]), "workdir": str(workdir),
           "machine": machine, "versions": versions,
           "wall_seconds": wall,  # this run's: seeds and models it reused cost ~nothing
           "experiment": experiment, **doc}
    out, md = outputs(args, name, today)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    v = versions
    md.write_text(f"# Accuracy: {name}, {today}\n\n" + (reports / "compare.md").read_text()
                  + f"\n`{doc['command']}` ({wall:.0f} s; {machine['summary']}; mlfd "
                  f"{v['mlfd']}, torch {v['torch']}, timm {v['timm']}, Python "
                  f"{v['python']}).\n")
    print(md.read_text())
    print(f"-> {out}")
    return doc


if __name__ == "__main__":
    main()
