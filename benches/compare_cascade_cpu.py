#!/usr/bin/env python3
"""Stable Cascade on the CPU: `wuerstchen generate` against diffusers 0.42.1's
`StableCascadeCombinedPipeline` on the same folders, size, steps, seed and thread count,
alternated, each in its own process. Stage times: ours from `generate --json`'s timings,
diffusers' from its step callbacks (prior: first to last prior callback plus the first step;
decoder + VQGAN: the rest of the call).

    wuerstchen tiny-model --family stable-cascade --size real --out /tmp/sclite   # the lite pair
    python benches/compare_cascade_cpu.py --root /tmp/sclite --lite --size 256 --prior-steps 10 \\
        --decoder-steps 4 --threads 2 --rounds 2 --wuerstchen target/release/wuerstchen

Prints one JSON line per run and a summary. Needs the pinned stack of tests/fixtures/requirements.txt.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def diffusers_run(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import diffusers.pipelines as pipelines
    import diffusers.pipelines.deprecated.wuerstchen as w
    from diffusers import StableCascadeCombinedPipeline, StableCascadeDecoderPipeline, StableCascadePriorPipeline
    from diffusers.models import StableCascadeUNet

    if not hasattr(pipelines, "wuerstchen"):  # the Hub's model_index names the pre-0.27 module
        setattr(pipelines, "wuerstchen", w)
    t0 = time.perf_counter()
    kw = dict(torch_dtype=torch.float32)
    prior_kw, decoder_kw = dict(kw), dict(kw)
    if args.lite:
        prior_kw["prior"] = StableCascadeUNet.from_pretrained(f"{args.root}/prior", subfolder="prior_lite", **kw)
        decoder_kw["decoder"] = StableCascadeUNet.from_pretrained(f"{args.root}/decoder", subfolder="decoder_lite", **kw)
    prior = StableCascadePriorPipeline.from_pretrained(f"{args.root}/prior", **prior_kw)
    dec = StableCascadeDecoderPipeline.from_pretrained(f"{args.root}/decoder", **decoder_kw)
    pipe = StableCascadeCombinedPipeline(
        tokenizer=dec.tokenizer, text_encoder=dec.text_encoder, decoder=dec.decoder, scheduler=dec.scheduler,
        vqgan=dec.vqgan, prior_prior=prior.prior, prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer, prior_scheduler=prior.scheduler)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    marks = {}

    def prior_cb(p, i, t, kw):
        marks["prior_end"] = time.perf_counter()
        return kw

    t0 = time.perf_counter()
    pipe(prompt="a photo of a cat", width=args.size, height=args.size, prior_num_inference_steps=args.prior_steps,
         num_inference_steps=args.decoder_steps, generator=torch.Generator("cpu").manual_seed(1), output_type="np",
         prior_callback_on_step_end=prior_cb)
    end = time.perf_counter()
    print(json.dumps(dict(who="diffusers", load_s=round(load, 3), total_s=round(end - t0, 3),
                          prior_s=round(marks["prior_end"] - t0, 3), decoder_vqgan_s=round(end - marks["prior_end"], 3))))


def ours(args):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as d:
        cmd = [args.wuerstchen, "-q", "generate", "--prompt", "a photo of a cat", "--width", str(args.size),
               "--height", str(args.size), "--seed", "1", "--prior-steps", str(args.prior_steps),
               "--decoder-steps", str(args.decoder_steps), "--prior", f"{args.root}/prior",
               "--decoder", f"{args.root}/decoder", "--device", "cpu", "--json", "--output", f"{d}/x.png"]
        if args.lite:
            cmd += ["--model", "stable-cascade-lite"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t0
    line = json.loads(out.strip().splitlines()[-1])
    t = line["timings_s"]
    print(json.dumps(dict(who="wuerstchen", process_s=round(wall, 3), total_s=round(sum(t.values()), 3),
                          prior_s=t.get("prior"), decoder_vqgan_s=round(t.get("decoder", 0) + t.get("vqgan", 0), 3))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--lite", action="store_true", help="the networks in prior_lite/ and decoder_lite/")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prior-steps", type=int, default=60)
    ap.add_argument("--decoder-steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--wuerstchen", default="wuerstchen")
    ap.add_argument("--diffusers-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.diffusers_only:
        return diffusers_run(args)
    for _ in range(args.rounds):
        ours(args)
        sys.stdout.flush()
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--diffusers-only"], env=env, check=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
