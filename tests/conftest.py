import os

# Triton kernels run on the CPU through the interpreter in CI (no GPU there).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed():
    # fresh random inputs every run (the seed is printed on failure by pytest's -ra summary via the id)
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
