"""Is data/video.py's YUV->RGB right?  Synthetic clips (data/synth.py, encoded exactly as the
generator does: rgb24 -> yuv420p by swscale, VP9) decoded three ways and compared with the RGB the
generator rendered:

  ours     frames_to_rgb: BT.601 limited range (the stream is untagged), bilinear centre-sited chroma
  swscale  PyAV to_ndarray(format="rgb24") (the conversion before 220f50b)

Reported: max / mean |ours - swscale| over every pixel, and each one's mean |error| against the
source in flat regions (a 7x7 neighbourhood of one colour: matrix and range errors show there)
and at edges (chroma siting and upsampling show there).  Appends one row to
bench/results/recipe_search.jsonl (evidence for the recipe investigation).

    python bench/yuv_conversion.py [--clips 12]
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import append_result, env_info  # noqa: E402


def main() -> None:
    import av
    from scipy.ndimage import maximum_filter, minimum_filter
    from valor_fast.data import synth, video
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "recipe_search.jsonl"))
    args = ap.parse_args()
    combos = synth.video_combos()
    diff_max, diff_mean, err = 0, [], {k: {"flat": [], "edge": []} for k in ("ours", "swscale")}
    fmt = None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.clips):
            c = combos[(i * 7) % len(combos)]
            attrs = dict(c) if isinstance(c, dict) else dict(zip(("color", "shape", "motion"), c))
            src = synth.render_frames(attrs, np.random.default_rng(100 + i), 96, 32)
            path = os.path.join(tmp, f"{i}.webm")
            synth.write_webm(path, src, 8)
            with av.open(path) as ct:
                frames = list(ct.decode(ct.streams.video[0]))
            f0 = frames[0]
            fmt = (f0.format.name, int(getattr(f0, "colorspace", -1)), int(getattr(f0, "color_range", -1)))
            ours = video.frames_to_rgb(frames).astype(np.int16)
            sws = np.stack([f.to_ndarray(format="rgb24") for f in frames]).astype(np.int16)
            d = np.abs(ours - sws)
            diff_max, diff_mean = max(diff_max, int(d.max())), diff_mean + [float(d.mean())]
            s = src.astype(np.int16)
            g = s.sum(-1)
            flat = maximum_filter(g, size=(1, 7, 7)) == minimum_filter(g, size=(1, 7, 7))
            for k, a in (("ours", ours), ("swscale", sws)):
                e = np.abs(a - s)
                err[k]["flat"].append(float(e[flat].mean()))
                err[k]["edge"].append(float(e[~flat].mean()))
    row = {"name": "yuv_conversion_check", "kind": "colour conversion vs swscale and vs the rendered source",
           "clips": args.clips, "frames_per_clip": 32, "size": 96, "stream_format_colorspace_range": fmt,
           "ours_vs_swscale_max_abs": diff_max, "ours_vs_swscale_mean_abs": round(float(np.mean(diff_mean)), 3)}
    for k in err:
        for r in ("flat", "edge"):
            row[f"{k}_vs_source_{r}_mean_abs"] = round(float(np.mean(err[k][r])), 3)
    row.update({"commit": env_info()["git_commit"], "command": "python bench/yuv_conversion.py"})
    append_result(args.out, row)
    print(row)


if __name__ == "__main__":
    main()
