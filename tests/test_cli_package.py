"""mlfd_cli as a package (docs/architecture.md): its modules import only down the order
app <- session <- errors <- relaunch <- verbs <- main, and --help lists the verbs in the
pipeline's order whichever module registers them."""

import re

import grimp
from helpers import run

# lower rank first; modules of one rank must not import each other
RANKS = {"mlfd_cli.app": 0, "mlfd_cli.session": 1, "mlfd_cli.errors": 2, "mlfd_cli.relaunch": 3,
         "mlfd_cli.train": 4, "mlfd_cli.report": 4, "mlfd_cli.housekeeping": 4,
         "mlfd_cli.compare": 4, "mlfd_cli.predict": 4, "mlfd_cli.main": 5}
VERBS = ["teach", "cache", "fuse", "distill", "eval", "compare", "check", "export", "predict",
         "list", "clean", "info"]


def test_the_cli_modules_import_only_downward():
    graph = grimp.build_graph("mlfd_cli")
    modules = graph.find_children("mlfd_cli")
    assert modules == set(RANKS)  # a new module gets its place here
    upward = sorted((a, b) for a in modules for b in graph.find_modules_directly_imported_by(a)
                    if b in RANKS and RANKS[b] >= RANKS[a])
    assert upward == []


def test_help_lists_the_verbs_in_the_pipeline_order(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    panel = out[out.index("Commands"):]
    assert re.findall(r"^│ (\w+) ", panel, flags=re.M) == VERBS
