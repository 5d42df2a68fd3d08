# Triton's interpreter must be chosen before triton is first imported; torch._dynamo,
# torchvision and timm all import it, so this runs before anything else in the suite.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MLFD_NO_PROGRESS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A complete L2 experiment on tiny data (teachers, caches, joint teacher, student of
    alpha), its experiment.yaml matching the options it was made with. Copy before use."""
    from helpers import ARCHS, TINY, make_npz, pin_overrides, quiet

    root = tmp_path_factory.mktemp("finished")
    a, b = make_npz(root / "alpha.npz", 0), make_npz(root / "beta.npz", 1, classes=4, channels=3)
    w = root / "ws"
    code = quiet("distill", "--workdir", w, "--teacher", f"{a}={ARCHS[0]}", "--teacher",
                 f"{b}={ARCHS[1]}", "--dataset", "alpha", "--levels", 2, *TINY)
    assert code == 0
    pin_overrides(w)
    return w


@pytest.fixture
def ws(finished, tmp_path):
    """A private copy of the finished experiment."""
    import shutil

    w = tmp_path / "ws"
    shutil.copytree(finished, w)
    return w
