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
