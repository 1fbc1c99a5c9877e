import os
import zlib

# Triton kernels run on the CPU through the interpreter in CI (no GPU there).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# Fresh random inputs every session, reproducible on demand: the session draws a base seed (or
# takes VALOR_FAST_TEST_SEED), each test seeds torch with crc32(base, test id), so one test's seed
# does not depend on which other tests ran.  The base is in pytest's header, and a failing test's
# report carries its seed and the command line that replays it.
_BASE_SEED = int(os.environ.get("VALOR_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def _test_seed(nodeid: str) -> int:
    return zlib.crc32(nodeid.encode(), _BASE_SEED) & 0x7FFFFFFF


def pytest_report_header(config):
    return f"valor-fast test seed: VALOR_FAST_TEST_SEED={_BASE_SEED}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("seed", f"torch seed {_test_seed(item.nodeid)}; replay with "
                                        f"VALOR_FAST_TEST_SEED={_BASE_SEED} pytest '{item.nodeid}'"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = _test_seed(request.node.nodeid)
    torch.manual_seed(seed)
    yield seed


# Kernel tests run on the CPU (under the interpreter) by default.  On a GPU machine,
#   VALOR_FAST_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/kernels tests/ops ...
# makes the modules that opt in (pytestmark = usefixtures("kernel_device")) create their tensors
# on that device, so the compiled kernels are what is checked against the float64 references.
KERNEL_TEST_DEVICE = os.environ.get("VALOR_FAST_TEST_DEVICE", "cpu")


@pytest.fixture
def kernel_device():
    if KERNEL_TEST_DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.fail(f"VALOR_FAST_TEST_DEVICE={KERNEL_TEST_DEVICE} but torch sees no CUDA device")
    with torch.device(KERNEL_TEST_DEVICE):
        yield torch.device(KERNEL_TEST_DEVICE)
