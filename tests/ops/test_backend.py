"""valor_fast.ops.backend.BackendSwitch on its own: code beats env beats auto, env read per call,
strict forced backends, availability probed once, each choice logged once."""
import pytest
import torch

from valor_fast.ops.backend import BackendSwitch
from valor_fast.utils.log import _ONCE


def _switch(probes):
    def probe():
        probes.append(1)
        return {"fast": (False, "not installed (pip install fast)"), "slow": (True, "torch")}

    def check(backend, device, big=False):
        return "too big for slow" if backend == "slow" and big else None

    return BackendSwitch("toyop", "VALOR_FAST_TOYOP", ("fast", "slow"), probe,
                         lambda device, big=False: ("slow", f"{device.type} tensors"), check)


def test_choice_order_and_env_per_call(monkeypatch):
    probes = []
    sw = _switch(probes)
    cpu = torch.device("cpu")
    monkeypatch.delenv("VALOR_FAST_TOYOP", raising=False)
    assert sw.forced() is None and sw.choose("op", device=cpu) == "slow"
    assert any(k.startswith("toyop:op:slow:auto: cpu tensors") for k in _ONCE)
    monkeypatch.setenv("VALOR_FAST_TOYOP", "slow")
    assert sw.forced() == "slow"
    with sw.use_backend("fast"):
        assert sw.forced() == "fast"  # code beats the env var
        with sw.use_backend(None):
            assert sw.forced() == "slow"  # lifting the code override: the env var again
    monkeypatch.setenv("VALOR_FAST_TOYOP", "auto")
    assert sw.forced() is None
    sw.set_backend("slow")
    assert sw.forced() == "slow"
    sw.set_backend(None)
    assert len(probes) == 1  # probed once however often it is asked


def test_strict_forcing_and_bad_names(monkeypatch):
    sw = _switch([])
    cpu = torch.device("cpu")
    with sw.use_backend("fast"), pytest.raises(RuntimeError, match=r"toyop op: backend 'fast' forced .*pip install fast"):
        sw.choose("op", device=cpu)
    with sw.use_backend("slow"), pytest.raises(RuntimeError, match="too big for slow"):
        sw.choose("op", device=cpu, big=True)
    with pytest.raises(ValueError, match="use_backend: toyop backend must be one of"):
        with sw.use_backend("medium"):
            pass
    monkeypatch.setenv("VALOR_FAST_TOYOP", "medium")
    with pytest.raises(ValueError, match="VALOR_FAST_TOYOP.*'medium'"):
        sw.choose("op", device=cpu)
    monkeypatch.setenv("VALOR_FAST_TOYOP", "fast")
    with pytest.raises(RuntimeError, match=r"forced \(VALOR_FAST_TOYOP\)"):
        sw.choose("op", device=cpu)
