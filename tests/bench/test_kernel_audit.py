"""The ahead-of-time kernel audit of the Triton kernels (issue 17's CI gate): `bench/kernel_audit.py
--check` over every kernel family it finds (bench/audit_<family>.py for the families in
`kernel_audit.FAMILIES`: attention, fused ops, contrastive when its module is present), each kernel
compiled for sm_80 and sm_90a -- no compile error, shared memory within the limit, no spill in a
16-bit path, tensor-core instructions (HMMA / HGMMA) in every kernel that multiplies matrices.

What CI audits (a representative subset): each family's *default* cases -- a case name without a
"/" (a family may instead list its CI cases in `CI_CASES`): the first configuration of the set
each launcher autotunes over, bf16, at its VALOR shape (attention: ViT-B/16, decoder causal +
key padding, Swin's bias forward and bias-gradient backward; fused: add+LN 768, bias+GELU 3072,
CE 4096-column chunks; contrastive: each kernel at each VALOR batch size): 52 rows (28 attention +
fused, 24 contrastive), 47 s user + 4 s system CPU with a cold Triton cache on the 2-core CI
machine (attention + fused alone: 25 s + 3 s).  The full sweep (every configuration of every set, every
VALOR shape, bf16 / fp16 / fp32: 898 rows, 4 min 52 s user + 34 s system CPU, too long for CI) is
`python bench/kernel_audit.py --check`, whose rows are committed in bench/results/kernel_audit.jsonl.  The csrc kernels' audit is tests/csrc/test_csrc_build.py (its nvcc
build is shared with the other csrc tests).

A subprocess: the audit compiles real kernels (TRITON_INTERPRET=0), the test session runs under
the interpreter.  Audit cases are built from the launchers' own plans (kernels/*.py `_*_plan`),
so a launcher change is audited as launched.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AUDIT = os.path.join(ROOT, "bench", "kernel_audit.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the attention / fused kernels that multiply matrices (tl.dot); the CE chunk kernels are
# row-wise softmax statistics over cuBLAS logits, LayerNorm and GELU are elementwise / row-wise
MMA = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
# the default cases this file checks in detail (each must be in the CI selection)
MINE = ("attn_fwd", "attn_fwd_causal", "attn_fwd_bias", "attn_bwd_preprocess", "attn_bwd_dkdv",
        "attn_bwd_dkdv_bias", "attn_bwd_dq", "attn_bwd_dq_bias", "add_ln_fwd", "add_ln_bwd", "bias_gelu_fwd",
        "bias_gelu_bwd", "ce_fwd", "ce_bwd")


def ci_cases() -> list:
    """The CI selection: per family module present, its CI_CASES or its default (no "/") cases."""
    from bench import kernel_audit as ka
    return ka.ci_case_names()


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("triton")
    names = ci_cases()
    assert set(MINE) <= set(names), sorted(set(MINE) - set(names))
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, AUDIT, "--only", ",".join(names), "--check", "--no-write", "--json"],
                         capture_output=True, text=True, timeout=900, env=env)
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    bad = [(r["case"], r["arch"], r["findings"]) for r in out if r.get("findings")]
    assert res.returncode == 0, f"audit findings {bad}\n{res.stderr[-3000:]}"
    assert sorted({r["case"] for r in out}) == sorted(names), "every CI case produced rows"
    return out


def test_every_default_launch_audited_on_both_archs(rows):
    mine = [r for r in rows if r["case"] in MINE]
    got = sorted((r["case"], r["arch"]) for r in mine)
    assert got == sorted((c, a) for c in MINE for a in ("sm_80", "sm_90a"))
    for r in mine:
        assert r["source"] == "triton" and r["registers"] > 0 and r["spill_stores"] is not None, r["case"]
        assert r["config"]["default"] and r["config"]["rank"] == 0 and r["config"]["dtype"] == "bf16"


def test_no_findings_no_spills_and_tensor_cores(rows):
    for r in rows:  # every family: what --check gates
        assert r["findings"] == [], (r["case"], r["arch"], r["findings"])
        if r.get("is_16bit"):
            assert r["spill_bytes"] == 0, (r["case"], r["arch"])
        if r.get("mma_kernel"):
            assert r["tensor_core_instr"], (r["case"], r["arch"])
    for r in rows:
        if r["case"] not in MINE:
            continue
        assert r["is_16bit"], r["case"]
        assert r["mma_kernel"] == (r["kernel"] in MMA), (r["case"], r["kernel"])
        # the attention forward's 64- and 128-row query tiles are warpgroup MMAs on Hopper (HGMMA)
        if r["kernel"] == "_fwd_kernel" and r["arch"] == "sm_90a":
            assert "HGMMA" in r["tensor_core_instr"], (r["case"], r["instr_kinds"])
        if r["mma_kernel"] and r["arch"] == "sm_80":
            assert r["tensor_core_instr"] == ["HMMA"], (r["case"], r["instr_kinds"])


def test_launch_configs_as_planned(rows):
    """The rows' launch options are the plan's: 8 warps for 128-row attention tiles on sm_90a,
    the short-query (40-token decoder) forward in 64-row tiles, Swin's fp32 bias rows of 196
    read as 16-byte vectors."""
    for r in rows:
        if r["case"] not in MINE:
            continue
        cex = r["config"]["constexprs"]
        if r["kernel"] in ("_fwd_kernel", "_bwd_dq_kernel") and cex.get("BLOCK_M") == 128 and r["arch"] == "sm_90a":
            assert r["threads"] == 256, (r["case"], r["config"])
        if r["case"] == "attn_fwd_causal":
            assert cex["BLOCK_M"] == 64 and cex["CAUSAL"] and cex["HAS_KPM"], r["config"]
        if r["case"] in ("attn_fwd_bias", "attn_bwd_dq_bias"):
            assert cex["HAS_BIAS"] and cex["BIAS_VEC"] == 4, r["config"]
        if r["case"] == "attn_bwd_dq_bias":
            assert cex["DBIAS_MODE"] != 0, r["config"]  # the bias-gradient path is what is audited
