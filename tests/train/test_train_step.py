"""The training-step benchmark harness (bench/train_step.py) and the fused paths of the model it
compares: grouped decoder == per-group passes, fused ops (Triton, interpreted) == the eager model,
and torch.compile(fullgraph=True) tracing the custom ops without graph breaks.  No timing is
asserted anywhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

from valor_fast.config import LossConfig
from valor_fast.model.args import model_config
from valor_fast.model.layers import BertLayer, PreNormBlock
from valor_fast.model.valor import build_model
from valor_fast.ops import attention as attn_ops
from valor_fast.ops import contrastive as con_ops
from valor_fast.ops import fused as fused_ops
from valor_fast.tasks.mgc import mgc_loss
from valor_fast.tasks.pretrain import pretrain_step_losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import bench.train_step as ts  # noqa: E402

# a smaller tiny: 2 frames of 32 px (4 patches + CLS), 16-token captions
SMALL = dict(image_size=32, vision_width=64, vision_heads=2, text_width=64, text_heads=2, text_ffn=128,
             audio_width=64, audio_heads=2, contra_dim=32, audio_frames=128)
TEXT_LEN = 16


def _small_model(seed):
    torch.manual_seed(seed)
    return build_model(model_config("tiny", **SMALL))


def test_train_step_script_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train_step.py"), "--size", "tiny",
                        "--batch", "3", "--text-len", "16", "--frames", "2", "--device", "cpu",
                        "--steps", "2", "--warmup", "1", "--parity-steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity max relative difference" in r.stdout and ": ok" in r.stdout, r.stdout
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [x["impl"] for x in rows] == ["eager", "fast"]
    for x in rows:
        assert x["parity"]["ok"] and x["parity"]["max_rel"] < 1e-4
        assert x["batch"] == 3 and len(x["step_ms"]) == 2 and x["samples_per_s"] > 0
        assert set(x["breakdown_ms"]) == {"h2d", "encoders", "mga", "decoder_mgc", "backward", "optimizer"}
        assert x["model_flops_per_sample"] > 0 and x["peaks"]["matmul_tflops"] > 0
        assert x["device"] == "cpu" and x["command"]


def test_parity_check_catches_different_models():
    mcfg = model_config("tiny", **SMALL)
    hb = ts.make_batch(mcfg, 2, 2, 1, 16, seed=1)
    args = ts.parse(["--device", "cpu"])
    cpu = torch.device("cpu")
    steps = {"eager": ts.Step("eager", _small_model(0), LossConfig(), cpu, None, args),
             "fast": ts.Step("fast", _small_model(1), LossConfig(), cpu, None, args)}
    res = ts.parity(steps, hb, 1, 1e-4)
    assert not res["ok"] and res["max_rel"] > 1e-3


def _batch(mcfg, B=2, frames=2, seed=0):
    hb = ts.make_batch(mcfg, B, frames, 1, TEXT_LEN, seed)
    hb["has_audio"][-1] = False  # one silent clip: its T-A terms drop out
    return hb


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grouped_decoder_matches_per_group_passes():
    model = _small_model(0)
    mcfg = model.cfg
    b = _batch(mcfg, B=3)
    vt, at = model.encode_video(b["video"]), model.encode_audio(b["audio"])
    memory, n_video = model.memory(vt, at)
    res = {}
    for grouped in (True, False):
        model.zero_grad(set_to_none=True)
        out = mgc_loss(model, b["text_ids"], b["text_mask"], memory, n_video, "tv,ta,tav", 0.6,
                       b["has_audio"], draws=b["mask_rand"], grouped=grouped)
        torch.stack(list(out.values())).sum().backward(retain_graph=True)
        res[grouped] = ({k: v.detach() for k, v in out.items()}, _grads(model))
    (l1, g1), (l0, g0) = res[True], res[False]
    assert l1.keys() == l0.keys() == {"tv", "ta", "tav"}
    for k in l1:
        torch.testing.assert_close(l1[k], l0[k], rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


def _step(model, b, fused: str, attn: str):
    model.zero_grad(set_to_none=True)
    with fused_ops.use_backend(fused), attn_ops.use_backend(attn), con_ops.use_backend("torch"):
        out = pretrain_step_losses(model, b, LossConfig())
        out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(model)


def test_model_on_fused_triton_ops_matches_eager_model():
    """The whole pretraining step with the Triton fused ops and flash attention (interpreted)
    against the unfused model: every loss term and every parameter gradient."""
    model = _small_model(2)
    b = _batch(model.cfg, B=2, seed=3)
    ref_l, ref_g = _step(model, b, "eager", "math")
    tri_l, tri_g = _step(model, b, "triton", "triton")
    assert ref_l.keys() == tri_l.keys()
    for k in ref_l:
        torch.testing.assert_close(tri_l[k], ref_l[k], rtol=1e-4, atol=1e-5, msg=k)
    assert ref_g.keys() == tri_g.keys() and len(ref_g) > 50
    for n in ref_g:
        torch.testing.assert_close(tri_g[n], ref_g[n], rtol=2e-3, atol=2e-5, msg=n)


def test_fused_model_path_is_exercised():
    """Guard against the fused path silently not running: with the Triton backend forced and the
    fused ops made to fail, a forward must fail."""
    model = _small_model(0)
    b = _batch(model.cfg)
    orig = fused_ops._k_aln.add_layer_norm
    fused_ops._k_aln.add_layer_norm = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("fused ran"))
    try:
        with fused_ops.use_backend("triton"), pytest.raises(RuntimeError, match="fused ran"):
            pretrain_step_losses(model, b, LossConfig())
        with fused_ops.use_backend("eager"):   # the unfused baseline never calls it
            pretrain_step_losses(model, b, LossConfig())
    finally:
        fused_ops._k_aln.add_layer_norm = orig


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_blocks_compile_fullgraph_with_custom_ops(backend):
    """torch.compile(fullgraph=True) of the decoder layer (causal self-attn + cross-attn + FFN) and
    of a ViT block: no graph break (fullgraph raises on one; explain() counts zero), our custom ops
    (flash attention, add+LN, bias+GELU) traced, outputs and gradients equal to eager."""
    torch.manual_seed(0)
    layer, blk = BertLayer(32, 4, 64), PreNormBlock(32, 4, act="quick_gelu")
    x = torch.randn(2, 7, 32, requires_grad=True)
    mem = torch.randn(2, 5, 32)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, 5:] = False
    with attn_ops.use_backend(backend if backend == "triton" else "sdpa"), fused_ops.use_backend(backend):
        ex = torch._dynamo.explain(layer)(x, key_padding_mask=kpm, causal=True, memory=mem)
        assert ex.graph_break_count == 0 and ex.graph_count == 1
        for mod, kw in ((layer, dict(key_padding_mask=kpm, causal=True, memory=mem)), (blk, {})):
            ref = mod(x, **kw)
            (gref,) = torch.autograd.grad(ref.square().sum(), x)
            out = torch.compile(mod, backend="aot_eager", fullgraph=True)(x, **kw)
            (gout,) = torch.autograd.grad(out.square().sum(), x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gout, gref, rtol=1e-5, atol=1e-5)


def test_valor_fast_bench_cli_step_only(tmp_path):
    """`valor-fast bench` end to end on the CPU (step benchmark only; kernels need CUDA): the
    measured peaks and the step rows land in the results folder with their peak share."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-m", "valor_fast.cli", "bench", "--only", "step", "--size", "tiny",
                        "--batch", "2", "--quick", "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    peaks = [json.loads(l) for l in (tmp_path / "peaks.jsonl").read_text().splitlines()]
    rows = [json.loads(l) for l in (tmp_path / "train_step.jsonl").read_text().splitlines()]
    assert len(peaks) == 1 and peaks[0]["matmul_tflops"] > 0 and peaks[0]["copy_gbps"] > 0
    assert [x["impl"] for x in rows] == ["eager", "fast"]
    for x in rows:
        assert x["run_id"] == peaks[0]["run_id"]
        assert abs(x["peak_share"] - x["model_tflops"] / peaks[0]["matmul_tflops"]) < 1e-9
    assert "step tiny B=2 fast" in r.stdout
