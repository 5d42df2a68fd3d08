"""mlfd.data's layout (issue 17): datasets/, formats/ and pipelines/ packages, the built-in
families registered on import, the two pipeline backends independent of each other."""

import importlib.util
import subprocess
import sys

import grimp
import pytest


def test_importing_the_registry_registers_every_family():
    # A fresh interpreter: nothing else of mlfd imported first.
    code = ("from mlfd.data.datasets.registry import get_dataset, list_datasets\n"
            "print(' '.join(list_datasets()))\n"
            "print(get_dataset('mnist-mini').load('test').images.shape)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr.strip().splitlines()[-1:]
    names, shape = proc.stdout.splitlines()
    assert names.split() == [
        "animal-mnist", "animal-mnist-mini", "cifar10", "cifar100", "fashion-mnist",
        "fashion-mnist-mini", "imagenet-sketch", "mnist", "mnist-mini", "tinyimagenet",
    ]
    assert shape == "(1000, 28, 28, 1)"


@pytest.mark.parametrize("old", ["mlfd.data.registry", "mlfd.data.pipeline",
                                 "mlfd.data.dali_pipeline"])
def test_the_old_modules_are_gone(old):
    assert importlib.util.find_spec(old) is None


def test_the_pipeline_backends_do_not_import_each_other():
    graph = grimp.build_graph("mlfd")
    torch_side = "mlfd.data.pipelines.torch_pipeline"
    dali_side = {"mlfd.data.pipelines.dali", "mlfd.data.pipelines.dali_augment"}
    for dali in dali_side:
        assert graph.find_shortest_chain(torch_side, dali) is None
        assert graph.find_shortest_chain(dali, torch_side) is None
    # Both stand on the shared base, which imports neither.
    assert graph.find_modules_directly_imported_by("mlfd.data.pipelines.base").isdisjoint(
        dali_side | {torch_side})
