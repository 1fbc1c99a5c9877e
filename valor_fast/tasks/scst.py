"""Self-critical sequence training (SCST) for captioning: the CIDEr of each sampled caption minus a
baseline weights the log-likelihood of the sample (Rennie et al. 2017; VALOR offers it as an
optional caption fine-tuning stage).  The baseline is the mean reward of the clip's other samples
(leave-one-out, Luo 2020), not the greedy caption: on a model already fine-tuned with MGC,
temperature-1 samples score far below greedy decoding (CIDEr ~1.4 vs ~3.3 on the embedded
default), so a greedy baseline makes every advantage negative and only pushes probability down.

Sampling (`model.decoding.sample`) runs the cached decoder with gradients on: each step feeds the committed prefix once and
peeks at `[MASK]` (the same two one-token passes as beam search), and autograd flows through the
cached keys/values, so a sample of T tokens costs 2T one-token passes rather than T full passes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ..config import LossConfig
from ..data.tokenizer import DECODE_IDS
from ..model.decoding import sample
from ..model.valor import VALOR
from .base import Task, register_task
from .mgc import audio_presence, group_memory_masks


def cider_rewards(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per-caption CIDEr-D (pycocoevalcap; document frequencies from this batch's references)."""
    from pycocoevalcap.cider.cider import Cider
    from ..eval.metrics import simple_tokenize
    gts = {i: [simple_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [simple_tokenize(p) or "empty"] for i, p in enumerate(preds)}
    _, scores = Cider().compute_score(gts, res)
    return torch.as_tensor(scores, dtype=torch.float32)


def scst_step_losses(model: VALOR, batch: dict, cfg: LossConfig, samples: int = 5, max_len: int = 20,
                     generator: Optional[torch.Generator] = None, tokenizer=None) -> Dict[str, torch.Tensor]:
    groups = [g.strip() for g in cfg.groups.split(",") if g.strip()]
    group = groups[0]
    vt = model.encode_video(batch["video"])
    at = model.encode_audio(batch["audio"])
    memory, n_video = model.memory(vt, at)
    B = memory.shape[0]
    mm = group_memory_masks([group], B, n_video, memory.shape[1] - n_video, audio_presence(batch, cfg), memory.device)
    if samples < 2:
        raise ValueError(f"loss.scst_samples must be >= 2 (leave-one-out baseline), got {samples}")
    mem_k = memory.repeat_interleave(samples, 0)                      # (B*K, Lm, C)
    mm_k = mm.repeat_interleave(samples, 0)
    seqs, logp = sample(model, mem_k, mm_k, max_len, generator, **DECODE_IDS)
    refs = batch["captions"]
    preds = [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]
    r = cider_rewards(preds, [refs[i // samples] for i in range(B * samples)]).to(logp.device).view(B, samples)
    baseline = (r.sum(1, keepdim=True) - r) / (samples - 1)          # mean of the clip's other samples
    adv = (r - baseline).view(-1)
    loss = -(adv * logp).mean()
    return {"loss": loss, "scst/reward": r.mean(), "scst/reward_best": r.max(1).values.mean(),
            "scst/logp": logp.detach().mean()}


@register_task("scst")
class SCSTTask(Task):
    """SCST caption fine-tuning objective (the FSDP / DDP root, like PretrainTask)."""

    evaluation = "caption"

    def __init__(self, model: VALOR, cfg: LossConfig, samples: int = 5, max_len: int = 20):
        super().__init__(model)
        self.cfg, self.samples, self.max_len = cfg, samples, max_len
        self._tok = None

    @classmethod
    def from_config(cls, model: VALOR, cfg) -> "SCSTTask":
        return cls(model, cfg.loss, cfg.loss.scst_samples, cfg.eval.max_len)

    def loss_keys(self) -> Tuple[str, ...]:
        return ("loss", "scst/reward", "scst/reward_best", "scst/logp")

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """The seed of this micro-batch's caption sampling: one draw from the step's generator
        mixed with the clips' dataset indices (the same step on another rank samples other noise)."""
        base = int(torch.randint(0, 2**62, (), generator=generator))
        return dict(batch, scst_seed=hash((base, tuple(batch["index"].tolist()))) & ((1 << 63) - 1))

    def forward(self, batch: dict, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        if self._tok is None:
            from ..data.tokenizer import get_tokenizer
            self._tok = get_tokenizer()
        if generator is None and "scst_seed" in batch:
            generator = torch.Generator().manual_seed(batch["scst_seed"])
        return scst_step_losses(self.model, batch, self.cfg, self.samples, self.max_len, generator, self._tok)
