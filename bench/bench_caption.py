"""Caption decoding speed: beam search with and without the decoder KV cache.

    python bench/bench_caption.py                          # base model, CUDA, bf16
    python bench/bench_caption.py --size tiny --device cpu --clips 2 --max-len 6 --no-save   # smoke run

The memory is a random (clips, frames x 197 + 129, 768) decoder memory (4 frames of ViT-B/16 +
one AST slice, already projected), so only decoding is timed.  Every generated sequence runs to
--max-len (the [SEP] logit is masked) so both variants produce the same number of tokens, and the
two are checked to produce identical sequences.  tokens/s = clips x beam x max_len / seconds.
Rows append to bench/results/caption.jsonl with device, versions, commit and command line.
"""
import argparse
import os
import statistics
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

from bench.common import append_result, env_info, time_ms  # noqa: E402
from valor_fast.data.tokenizer import DECODE_IDS, SEP_ID  # noqa: E402
from valor_fast.model.args import model_config  # noqa: E402
from valor_fast.model.decoding import beam_search  # noqa: E402
from valor_fast.model.valor import build_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-len", type=int, default=30)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=os.path.join(_HERE, "results", "caption.jsonl"))
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_caption.py: no CUDA device (torch.cuda.is_available() is False); "
                 "use --device cpu for a smoke run")
    dev = torch.device(a.device)
    cfg = model_config(a.size)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).eval()
    with torch.no_grad():   # never end early: equal work for both variants
        model.text.lm_head.bias[SEP_ID] = -1e4
    n_vid = a.frames * ((cfg.image_size // cfg.patch_size) ** 2 + 1)
    n_aud = (cfg.audio_mel_bins // 16) * (cfg.audio_frames // 16) + 1
    mem = torch.randn(a.clips, n_vid + n_aud, cfg.text_width, device=dev)
    amp = torch.autocast(a.device, dtype=torch.bfloat16) if a.dtype == "bf16" else torch.autocast(a.device, enabled=False)
    outs, rows = {}, []
    info = env_info()
    for cache in (True, False):
        def run():
            with amp:
                outs[cache] = beam_search(model, mem, None, beam=a.beam, max_len=a.max_len, use_cache=cache,
                                          **DECODE_IDS)
        ms = statistics.median(time_ms(run, dev, warmup=1, iters=a.iters))
        toks = a.clips * a.beam * a.max_len
        row = {"bench": "caption", "size": a.size, "clips": a.clips, "beam": a.beam, "max_len": a.max_len,
               "frames": a.frames, "memory_tokens": n_vid + n_aud, "dtype": a.dtype, "kv_cache": cache,
               "ms": ms, "tokens_per_s": toks / (ms / 1e3), "clips_per_s": a.clips / (ms / 1e3), **info}
        rows.append(row)
        print(f"kv_cache={str(cache):5s}  {ms:9.1f} ms  {row['tokens_per_s']:10.1f} tokens/s  "
              f"{row['clips_per_s']:8.2f} clips/s", flush=True)
    same = outs[True] == outs[False]
    print(f"cached and uncached sequences identical: {same}; speed-up {rows[1]['ms'] / rows[0]['ms']:.2f}x")
    for r in rows:
        r["sequences_identical"] = same
        if not a.no_save:
            append_result(a.out, r)
    return 0 if same or a.dtype == "bf16" else 1


if __name__ == "__main__":
    sys.exit(main())
