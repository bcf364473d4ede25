#!/usr/bin/env python3
"""A fresh diffusers process making one image, the way a Python user would: import,
from_pretrained, .to(device), one call, save the PNG. Time the whole process from outside
and compare with `wuerstchen generate` on the same folders:

    /usr/bin/time -f %e python benches/diffusers_coldstart.py --root DIR --width 256 --height 256
    /usr/bin/time -f %e wuerstchen generate --prior DIR/prior --decoder DIR/decoder -p "a photo of a cat" \\
        --width 256 --height 256 --seed 0 --output /tmp/ours.png

Prints the phase times as JSON on stdout. Needs the pinned stack of tests/fixtures/requirements.txt.
"""

import argparse
import json
import time

T0 = time.perf_counter()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="folder with prior/ and decoder/")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--out", default="/tmp/diffusers-coldstart.png")
    args = ap.parse_args()
    times = {}
    t = time.perf_counter()
    import torch

    import diffusers.pipelines as pipelines
    import diffusers.pipelines.deprecated.wuerstchen as w
    from diffusers import WuerstchenCombinedPipeline, WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    if not hasattr(pipelines, "wuerstchen"):  # the Hub's model_index names the pre-0.27 module
        setattr(pipelines, "wuerstchen", w)
    if args.threads:
        torch.set_num_threads(args.threads)
    times["import"] = time.perf_counter() - t
    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    prior = WuerstchenPriorPipeline.from_pretrained(f"{args.root}/prior", torch_dtype=dtype)
    decoder = WuerstchenDecoderPipeline.from_pretrained(f"{args.root}/decoder", torch_dtype=dtype)
    pipe = WuerstchenCombinedPipeline(
        tokenizer=decoder.tokenizer, text_encoder=decoder.text_encoder, decoder=decoder.decoder,
        scheduler=decoder.scheduler, vqgan=decoder.vqgan, prior_tokenizer=prior.tokenizer,
        prior_text_encoder=prior.text_encoder, prior_prior=prior.prior, prior_scheduler=prior.scheduler)
    times["from_pretrained"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe.to(args.device)
    times["to_device"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        image = pipe(prompt="a photo of a cat", width=args.width, height=args.height,
                     prior_timesteps=list(w.DEFAULT_STAGE_C_TIMESTEPS),
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
    times["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    image.save(args.out)
    times["save"] = time.perf_counter() - t
    times["in_process_total"] = time.perf_counter() - T0
    print(json.dumps({k: round(v, 3) for k, v in times.items()}))


if __name__ == "__main__":
    main()
