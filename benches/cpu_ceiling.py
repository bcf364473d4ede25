#!/usr/bin/env python3
"""How close a stage's time can get to diffusers' on this CPU: the multiply-add work of one
prior call and one decoder call, diffusers' time for each call, and the best matrix-product
rate torch reaches here, for comparison with `wuerstchen bench`'s ms per step:

    python benches/cpu_ceiling.py --root /tmp/real --width 1024 --height 1536 --threads 2

The work is counted by torch's `FlopCounterMode` on the models built from their config.json
(matrix products, convolutions and attention: 2 FLOP per multiply-add; elementwise ops are
not counted). The rate is the best of 20 runs of the prior's largest product. With matrix
products no faster than torch's, a stage cannot take less than its work at that rate, so a
target below `work / rate` needs a faster product kernel than torch's on this machine.
Prints one JSON object. Needs the pinned stack of tests/fixtures/requirements.txt.
"""

import argparse
import json
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="folder with prior/ and decoder/")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1536)
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="timed calls per stage, after one warm-up")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior

    # The shapes diffusers' pipelines use: the prior's latent is the image over 42.67 (rounded
    # up), the decoder's that times 10.67; classifier-free guidance doubles the prior's batch.
    h, w = math.ceil(args.height / 42.67), math.ceil(args.width / 42.67)
    prior_batch = 2 if args.prior_guidance > 1 else 1
    out = {"width": args.width, "height": args.height, "threads": args.threads}

    for name, cls in [("prior", WuerstchenPrior), ("decoder", WuerstchenDiffNeXt)]:
        folder = f"{args.root}/{name}/{name}"
        with torch.device("meta"):
            meta = cls.from_config(cls.load_config(folder))
        if name == "prior":
            inputs = lambda dev: (  # noqa: E731
                torch.randn(prior_batch, meta.config.c_in, h, w, device=dev),
                torch.ones(prior_batch, device=dev),
                torch.randn(prior_batch, 77, meta.config.c_cond, device=dev),
            )
            call = lambda m, x: m(*x)  # noqa: E731
        else:
            dh, dw = int(h * 10.67), int(w * 10.67)
            inputs = lambda dev: (  # noqa: E731
                torch.randn(1, meta.config.c_in, dh, dw, device=dev),
                torch.ones(1, device=dev),
                torch.randn(1, meta.config.effnet_embd, h, w, device=dev),
                torch.randn(1, 77, meta.config.clip_embd, device=dev),
            )
            call = lambda m, x: m(x[0], x[1], effnet=x[2], clip=x[3])  # noqa: E731
        counter = FlopCounterMode(display=False)
        with counter:
            call(meta, inputs("meta"))
        flop = counter.get_total_flops()
        model = cls.from_pretrained(folder, torch_dtype=torch.float32).eval()
        x = inputs("cpu")
        call(model, x)  # warm-up
        times = timed(lambda: call(model, x), args.runs)
        out[name] = {"gflop": round(flop / 1e9, 1), "diffusers_s": [round(t, 2) for t in times]}
        if name == "prior":
            out[name]["c"] = meta.config.c
        del model

    # The prior's largest product: its ResBlocks' c -> 4c layer at this size.
    rows, c = prior_batch * h * w, out["prior"]["c"]
    a, b = torch.randn(rows, c), torch.randn(c, 4 * c)
    best = min(timed(lambda: torch.mm(a, b), 20))
    rate = 2 * rows * c * 4 * c / best
    out["torch_mm_gflops"] = round(rate / 1e9, 1)
    for name in ("prior", "decoder"):
        s = out[name]
        s["diffusers_gflops"] = round(s["gflop"] / min(s["diffusers_s"]), 1)
        s["floor_s_at_torch_mm_rate"] = round(s["gflop"] * 1e9 / rate, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
