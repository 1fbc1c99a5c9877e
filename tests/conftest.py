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


# Kernel tests run on the CPU (under the interpreter) by default.  On a GPU machine,
#   VALOR_FAST_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/test_attention*.py ...
# makes the modules that opt in (pytestmark = usefixtures("kernel_device")) create their tensors
# on that device, so the compiled kernels are what is checked against the float64 references.
KERNEL_TEST_DEVICE = os.environ.get("VALOR_FAST_TEST_DEVICE", "cpu")


@pytest.fixture
def kernel_device():
    if KERNEL_TEST_DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.fail(f"VALOR_FAST_TEST_DEVICE={KERNEL_TEST_DEVICE} but torch sees no CUDA device")
    with torch.device(KERNEL_TEST_DEVICE):
        yield torch.device(KERNEL_TEST_DEVICE)
