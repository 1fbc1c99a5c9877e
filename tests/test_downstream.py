"""Downstream tasks: benchmark annotation adapters, beam search against exhaustive search, QA
prompting/masking/metrics, and (slow) the finetune -> eval flow of each task plus the caption and
embed commands on a small synthetic set."""
import json
import math

import pytest
import torch

from valor_fast.data.annotations import read_annotations
from valor_fast.eval.qa import answer_stats
from valor_fast.data.tokenizer import CLS_ID, DECODE_IDS, MASK_ID, SEP_ID
from valor_fast.model.decoding import beam_search
from valor_fast.tasks.mgc import mask_tokens
from valor_fast.tasks.qa import encode_qa, normalize_answer, qa_batch


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------
def test_benchmark_adapters(tmp_path):
    (tmp_path / "msrvtt.json").write_text(json.dumps({
        "videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video9", "split": "test"}],
        "sentences": [{"video_id": "video0", "caption": "a man sings", "sen_id": 0},
                      {"video_id": "video9", "caption": "a cat", "sen_id": 1},
                      {"video_id": "video0", "caption": "someone sings", "sen_id": 2}]}))
    r = read_annotations(str(tmp_path), "msrvtt:msrvtt.json#train")
    assert [(x["video_id"], x["captions"]) for x in r] == [("video0", ["a man sings", "someone sings"])]
    assert len(read_annotations(str(tmp_path), "msrvtt:msrvtt.json")) == 2
    (tmp_path / "1ka.csv").write_text("key,vid_key,video_id,sentence\nret0,msr9,video9,a cat plays\n")
    assert read_annotations(str(tmp_path), "msrvtt_1ka:1ka.csv")[0]["captions"] == ["a cat plays"]
    (tmp_path / "vatex.json").write_text(json.dumps([{"videoID": "abc_000001_000011", "enCap": ["x", "y"],
                                                       "chCap": ["z"]}]))
    assert read_annotations(str(tmp_path), "vatex:vatex.json")[0]["captions"] == ["x", "y"]
    (tmp_path / "ac.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,yt1,30,dog barks\n"
                                     "2,yt1,30,a dog barking\n3,yt2,0,rain\n")
    r = read_annotations(str(tmp_path), "audiocaps:ac.csv")
    assert [(x["video_id"], len(x["captions"])) for x in r] == [("yt1", 2), ("yt2", 1)]
    (tmp_path / "v32k.json").write_text(json.dumps([{"video_id": "yt_10.000_20.000", "desc": "a b"}]))
    assert read_annotations(str(tmp_path), "valor32k:v32k.json")[0]["video_id"] == "yt_10.000_20.000"
    (tmp_path / "qa.json").write_text(json.dumps([{"video_id": 7010, "question": "what is it?", "answer": "dog", "id": 0},
                                                  {"video_id": 7010, "question": "who?", "answer": "man", "id": 1}]))
    r = read_annotations(str(tmp_path), "msrvtt_qa:qa.json")
    assert r[0]["video_id"] == "video7010" and [q["answer"] for q in r[0]["qa"]] == ["dog", "man"]
    with pytest.raises(ValueError, match="unknown format"):
        read_annotations(str(tmp_path), "kinetics:x.json")
    with pytest.raises(ValueError, match="split"):
        read_annotations(str(tmp_path), "msrvtt:msrvtt.json#nosuch")


# ---------------------------------------------------------------------------------------------
# beam search == exhaustive search on a tiny vocabulary
# ---------------------------------------------------------------------------------------------
ALLOWED = [1037, 2417, 4418, SEP_ID]   # 'a', 'red', 'circle', [SEP]: every other id gets -inf


class _PrefixLM(torch.nn.Module):
    """A stand-in decoder whose next-token distribution is a fixed random function of the whole
    prefix (and of the clip), with only ALLOWED tokens possible: beam search sees it exactly as it
    sees VALOR (decode + lm_logits over `[CLS] w1..wt [MASK]`)."""

    def __init__(self, seed, V=4500):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, 8, generator=g)
        self.pos = torch.randn(40, 8, generator=g)
        self.out = torch.randn(8, V, generator=g) * 2.0
        self.block = torch.full((V,), float("-inf"))
        self.block[ALLOWED] = 0.0
        self.text = type("T", (), {"layers": []})()

    def decode(self, ids, mask, memory, memory_mask, memory_repeat=1, caches=None, offset=0):
        assert ids[0, -1] == MASK_ID
        pre = ids[:, :-1]
        h = torch.tanh((self.emb[pre] * self.pos[:pre.shape[1]]).sum(1) + memory[:, 0, :8])   # (N, 8)
        return torch.cat([torch.zeros(ids.shape[0], ids.shape[1] - 1, 8), h[:, None]], 1)

    def lm_logits(self, h):
        return h @ self.out + self.block

    def logp(self, memory, prefix):
        ids = torch.tensor([[CLS_ID] + prefix + [MASK_ID]])
        return torch.log_softmax(self.lm_logits(self.decode(ids, None, memory, None)[:, -1]), -1)[0]


def _exhaustive(lm, memory, max_len, lp):
    best, best_seq = -math.inf, None
    frontier = [([], 0.0)]
    for t in range(max_len):
        nxt = []
        for seq, s in frontier:
            lp_ = lm.logp(memory, seq)
            for tok in ALLOWED:
                s2 = s + float(lp_[tok])
                if tok == SEP_ID or t == max_len - 1:
                    out = seq if tok == SEP_ID else seq + [tok]
                    score = s2 / ((t + 1) ** lp)
                    if score > best:
                        best, best_seq = score, out
                else:
                    nxt.append((seq + [tok], s2))
        frontier = nxt
    return best_seq


@pytest.mark.parametrize("lp", [0.0, 1.0])
def test_beam_search_equals_exhaustive_search(lp):
    seed = int(torch.randint(1 << 30, ()))
    lm = _PrefixLM(seed)
    memory = torch.randn(3, 2, 16)
    max_len = 4
    want = [_exhaustive(lm, memory[i:i + 1], max_len, lp) for i in range(3)]
    # beam 27 >= 3^(max_len-1) live prefixes: nothing is ever pruned, so the search is exact
    got = beam_search(lm, memory, None, beam=27, max_len=max_len, length_penalty=lp, use_cache=False,
                      **DECODE_IDS)
    assert got == want, (seed, got, want)
    greedy = beam_search(lm, memory, None, beam=1, max_len=max_len, length_penalty=lp, use_cache=False,
                         **DECODE_IDS)
    for i in range(3):   # beam 1 is greedy: the argmax at every step
        seq = []
        for _ in range(max_len):
            tok = int(lm.logp(memory[i:i + 1], seq).argmax())
            if tok == SEP_ID:
                break
            seq.append(tok)
        assert greedy[i] == seq


def test_beam_search_never_emits_special_or_unused_ids():
    from valor_fast.data.tokenizer import FIRST_WORD_ID, PAD_ID
    from valor_fast.model.args import model_config
    from valor_fast.model.decoding import banned_token_mask, sample
    from valor_fast.model.valor import VALOR
    ban = banned_token_mask(30522, FIRST_WORD_ID, SEP_ID)
    assert ban[[PAD_ID, 1, 99, 100, CLS_ID, MASK_ID, 104, 998]].all() and not ban[SEP_ID]
    assert not ban[FIRST_WORD_ID:].any()
    assert DECODE_IDS["first_word_id"] == FIRST_WORD_ID
    m = VALOR(model_config("tiny", image_size=32, audio_frames=128)).eval()
    special = torch.tensor([PAD_ID, 1, 50, 100, CLS_ID, MASK_ID, 104, 500, 998])
    with torch.no_grad():   # make the special / unused ids the most likely by far, [SEP] never
        m.text.lm_head.bias[special] = 60.0
        m.text.lm_head.bias[SEP_ID] = -60.0
        m.text.lm_head.bias[2417] = 20.0          # 'red': the best id generation may emit
    mem = torch.randn(2, 9, m.cfg.text_width)
    unmasked = beam_search(m, mem, None, beam=1, max_len=5, **{**DECODE_IDS, "first_word_id": 0})
    assert any(t < FIRST_WORD_ID for s in unmasked for t in s)   # the bias does make them the argmax
    for beam, cache in ((1, True), (3, True), (2, False)):
        out = beam_search(m, mem, None, beam=beam, max_len=5, use_cache=cache, **DECODE_IDS)
        assert all(len(s) == 5 for s in out), out
        assert all(t >= FIRST_WORD_ID for s in out for t in s), out
    seqs, logp = sample(m, mem, None, 4, torch.Generator().manual_seed(0), **DECODE_IDS)
    assert all(t >= FIRST_WORD_ID for s in seqs for t in s) and torch.isfinite(logp).all()


# ---------------------------------------------------------------------------------------------
# QA
# ---------------------------------------------------------------------------------------------
def test_qa_encoding_masking_and_metrics():
    from valor_fast.data.tokenizer import get_tokenizer
    tok = get_tokenizer()
    qas = [[{"question": "what color is the shape?", "answer": "red"}],
           [{"question": "is the sound low, medium or high?", "answer": "very high"},
            {"question": "what shape?", "answer": "circle"}]]
    b = qa_batch(qas, tok, 16, torch.Generator().manual_seed(0))
    ids, mask, ans = b["qa_ids"], b["qa_mask"], b["answer_mask"]
    assert ids[0, 0] == CLS_ID and (ans & ~mask).sum() == 0
    for i in range(2):
        a = ids[i][ans[i]].tolist()
        assert a[-1] == SEP_ID                        # the answer ends with [SEP]
        p = int(ans[i].float().argmax())
        assert ids[i, p - 1] == SEP_ID                # right after the question's [SEP]
    assert tok.decode(ids[0][ans[0]].tolist(), skip_special_tokens=True) == "red"
    # only answer tokens are ever selected for prediction, at least one a row
    for _ in range(5):
        _, sel = mask_tokens(ids, mask, 0.6, eligible=ans)
        assert (sel & ~ans).sum() == 0 and sel.any(1).all()
    prompt, plen = encode_qa(tok, "what color is the shape?", None, 16)
    assert prompt[-1] == SEP_ID and plen == len(prompt)
    with pytest.raises(ValueError, match="does not fit"):
        encode_qa(tok, "q", "a b c d e f g h i j k l m n o p", 8)
    with pytest.raises(ValueError, match="no QA pairs"):
        qa_batch([[]], tok, 16)
    assert normalize_answer("The Red!") == "red" and normalize_answer("a  big   dog.") == "big dog"
    st = answer_stats(["red", "Red", "blue", "green"], train_answers=["red", "blue"])
    assert st["qa/answers_distinct"] == 3 and st["qa/top_answer_share"] == 0.5
    assert st["qa/answers_seen_in_train"] == 0.75


def test_qa_with_task_prompts_reads_the_question_as_the_prompt():
    """model.task_prompts QA (upstream's layout): the text is `[CLS] answer [SEP]`, the decoder's
    prompt `[CLS] answer the question <question> [SEP]`; a step trains on the answer tokens."""
    from valor_fast.config import LossConfig
    from valor_fast.data.tokenizer import get_tokenizer
    from valor_fast.model.args import model_config
    from valor_fast.model.valor import VALOR
    from valor_fast.tasks.qa import qa_step_losses
    tok = get_tokenizer()
    qas = [[{"question": "what color is the shape?", "answer": "red"}], [{"question": "what shape?", "answer": "a circle"}]]
    b = qa_batch(qas, tok, 16, torch.Generator().manual_seed(0), prompted=True)
    assert b["qa_ids"][0].tolist()[:3] == [CLS_ID, tok.convert_tokens_to_ids("red"), SEP_ID]
    assert b["answer_mask"][:, 0].sum() == 0 and b["answer_mask"][1].sum() == 3   # a circle [SEP]
    p0 = b["qa_prompt"][0].tolist()
    assert p0[:4] == [CLS_ID, 3437, 1996, 3160] and tok.decode(p0, skip_special_tokens=True) == \
        "answer the question what color is the shape?"
    m = VALOR(model_config("tiny", image_size=32, patch_size=8, task_prompts=True))
    batch = dict(b, video=torch.randn(2, 2, 3, 32, 32), audio=torch.randn(2, 1, 512, 64))
    out = qa_step_losses(m, batch, LossConfig(groups="tav"), torch.Generator().manual_seed(1))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and m.text.embeddings.prompt.weight.grad.abs().sum() > 0


def test_prompted_beam_search_cached_equals_uncached():
    from valor_fast.model.args import model_config
    from valor_fast.model.valor import VALOR
    m = VALOR(model_config("tiny", image_size=32, audio_frames=128)).eval()
    mem = torch.randn(2, 9, m.cfg.text_width)
    prompt = torch.tensor([[CLS_ID, 2054, 3609, SEP_ID], [CLS_ID, 2129, 2003, SEP_ID]])
    for beam in (1, 2):
        a = beam_search(m, mem, None, beam=beam, max_len=4, prompt=prompt, use_cache=True, **DECODE_IDS)
        u = beam_search(m, mem, None, beam=beam, max_len=4, prompt=prompt, use_cache=False, **DECODE_IDS)
        assert a == u and all(len(s) <= 4 for s in a)
    with pytest.raises(ValueError, match="prompt"):
        beam_search(m, mem, None, prompt=prompt[:1], **DECODE_IDS)


# ---------------------------------------------------------------------------------------------
# the whole flow on a small synthetic set (slow)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from valor_fast.data.synth import generate
    from valor_fast.cli import main
    root = tmp_path_factory.mktemp("down")
    generate(str(root / "ds"), seed=5, clips_per_combo=1, image_size=32, seconds=1.0, progress=False)
    common = ["--data.root", str(root / "ds"), "--data.synth", "false", "--model.image_size", "32",
              "--model.patch_size", "8", "--train.batch_size", "16", "--train.out_dir", str(root / "runs"),
              "--eval.max_len", "8", "--eval.beam", "2", "--train.log_every", "10"]
    assert main(["pretrain", "--config", "tiny", "--train.steps", "40", "--train.run_name", "pre",
                 "--train.final_eval", "false"] + common) == 0
    return root, common, str(root / "runs" / "pre" / "model.safetensors")


def _metrics(root, name):
    return json.loads((root / "runs" / name / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("task,key", [("retrieval", "retrieval/t2av/R@1"), ("caption", "caption/CIDEr"),
                                      ("qa", "qa/accuracy")])
def test_finetune_and_eval_each_task(pretrained, task, key, tmp_path):
    from valor_fast.cli import main
    root, common, ckpt = pretrained
    assert main(["finetune", "--task", task, "--init", ckpt, "--train.steps", "12",
                 "--train.run_name", f"ft_{task}"] + common) == 0
    m = _metrics(root, f"ft_{task}")
    assert key in m and 0.0 <= m[key] and math.isfinite(m[key])
    if task == "qa":
        assert m["qa/questions"] == 5 * m.get("eval/clips", m["qa/questions"] / 5)
        assert "qa/answers_seen_in_train" in m and "qa/answers_distinct" in m
    if task == "retrieval":
        assert "caption/CIDEr" not in m
    # eval of the fine-tuned weights through the CLI reproduces the final metric
    out = tmp_path / "m.json"
    run = root / "runs" / f"ft_{task}"
    assert main(["eval", "--ckpt", str(run / "model.safetensors"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())[key] == pytest.approx(m[key])


@pytest.mark.slow
def test_caption_and_embed_commands(pretrained, tmp_path, capsys):
    from safetensors import safe_open
    from valor_fast.cli import main
    root, common, ckpt = pretrained
    video = sorted((root / "ds" / "videos").iterdir())[0]
    audio = root / "ds" / "audios" / (video.stem + ".wav")
    assert main(["caption", str(video), "--ckpt", ckpt, "--audio", str(audio)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(str(video) + "\t") and len(line.split("\t")[1]) > 0
    assert main(["caption", str(video), "--ckpt", ckpt]) == 0   # audio from the container (none here: T-V)
    out = tmp_path / "f.safetensors"
    assert main(["embed", "--ckpt", ckpt, "--split", "test", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        ids = json.loads(f.metadata()["video_ids"])
        v, t = f.get_tensor("video"), f.get_tensor("text")
        assert v.shape[0] == t.shape[0] == len(ids) > 0
        assert torch.allclose(v.norm(dim=-1), torch.ones(len(ids)), atol=1e-4)
        assert f.get_tensor("video_frames").shape[:2] == (len(ids), 4)


# ---------------------------------------------------------------------------------------------
# SCST
# ---------------------------------------------------------------------------------------------
def test_scst_sampling_and_step():
    from valor_fast.config import LossConfig
    from valor_fast.model.args import model_config
    from valor_fast.data.tokenizer import get_tokenizer
    from valor_fast.model.valor import VALOR
    from valor_fast.model.decoding import Stepper, sample
    from valor_fast.tasks.scst import scst_step_losses
    m = VALOR(model_config("tiny", image_size=32, audio_frames=128)).eval()
    mem = torch.randn(3, 9, m.cfg.text_width)
    # greedy sampling is beam search with beam 1
    g_seqs, g_logp = sample(m, mem, None, 5, greedy=True, **DECODE_IDS)
    assert g_seqs == beam_search(m, mem, None, beam=1, max_len=5, **DECODE_IDS)
    # the summed log-probability equals a step-by-step recomputation without the cache
    seqs, logp = sample(m, mem, None, 5, torch.Generator().manual_seed(0), **DECODE_IDS)
    assert logp.requires_grad
    for i, seq in enumerate(seqs):
        st = Stepper(m, mem[i:i + 1], None, use_cache=False, bos_id=CLS_ID, mask_id=MASK_ID, eos_id=SEP_ID,
                     first_word_id=DECODE_IDS["first_word_id"])
        lp, tot = st.start(1, mem.device), 0.0
        for tok in seq + ([SEP_ID] if len(seq) < 5 else []):
            tot += float(lp[0, tok])
            if tok == SEP_ID:
                break
            lp = st.push(torch.tensor([tok]))
        assert abs(tot - float(logp[i])) < 1e-3 * max(1.0, abs(tot))
    # one SCST step: finite loss, gradients reach the decoder
    b = {"video": torch.randn(2, 2, 3, 32, 32), "audio": torch.randn(2, 1, 128, 64),
         "has_audio": torch.tensor([True, False]),
         "captions": [["a red circle moves"], ["a low tone beeps", "low beeps"]]}
    m.train()
    out = scst_step_losses(m, b, LossConfig(groups="tav"), samples=3, max_len=6, tokenizer=get_tokenizer())
    assert torch.isfinite(out["loss"]) and 0 <= float(out["scst/reward"])
    # an untrained model's samples all score CIDEr 0 (zero advantage): plant distinct rewards to
    # see the policy gradient reach the decoder
    import valor_fast.tasks.scst as scst
    real = scst.cider_rewards
    scst.cider_rewards = lambda preds, refs: torch.arange(len(preds), dtype=torch.float32)
    try:
        out = scst_step_losses(m, b, LossConfig(groups="tav"), samples=3, max_len=6, tokenizer=get_tokenizer())
    finally:
        scst.cider_rewards = real
    out["loss"].backward()
    assert m.text.layers[0].cross.q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scst_samples"):
        scst_step_losses(m, b, LossConfig(groups="tav"), samples=1, tokenizer=get_tokenizer())
