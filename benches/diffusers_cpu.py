#!/usr/bin/env python3
"""Times diffusers 0.42.1 on a Würstchen model folder pair on the CPU, for comparison with
`wuerstchen bench` on the same folders, sizes, steps and thread count:

    wuerstchen tiny-model --size mid --out /tmp/mid
    python benches/diffusers_cpu.py --root /tmp/mid --width 512 --height 512 --threads 2
    RAYON_NUM_THREADS=2 wuerstchen bench --prior /tmp/mid/prior --decoder /tmp/mid/decoder \\
        --width 512 --height 512 --device cpu

Prints one JSON object (same keys as `wuerstchen bench`: median seconds per stage, ms per step).
A pipeline's stage time includes its text encoder; `prior_loop` and `decoder_loop` are the
sampling loops alone (from the network's first call to the last step's end), which is what
`wuerstchen bench` times as its stages.
Needs the pinned stack of tests/fixtures/requirements.txt.
"""

import argparse
import json
import statistics
import time

import torch


class LoopClock:
    """The time from a network's first call to the last step's end (a pipeline callback)."""

    def __init__(self, net):
        self.first = self.last = None
        net.register_forward_pre_hook(self.called)

    def called(self, _module, _args):
        if self.first is None:
            self.first = time.perf_counter()

    def step_end(self, _pipe, _step, _t, kwargs):
        self.last = time.perf_counter()
        return kwargs

    def take(self):
        t, self.first, self.last = self.last - self.first, None, None
        return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="folder with prior/ and decoder/")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--prior-steps", type=int, default=None, help="default: DEFAULT_STAGE_C_TIMESTEPS")
    ap.add_argument("--decoder-steps", type=int, default=12)
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    import diffusers.pipelines as pipelines
    import diffusers.pipelines.deprecated.wuerstchen as w
    from diffusers import WuerstchenDecoderPipeline, WuerstchenPriorPipeline

    if not hasattr(pipelines, "wuerstchen"):  # the Hub's model_index names the pre-0.27 module
        setattr(pipelines, "wuerstchen", w)
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    prior = WuerstchenPriorPipeline.from_pretrained(f"{args.root}/prior", torch_dtype=torch.float32)
    t_prior = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoder = WuerstchenDecoderPipeline.from_pretrained(f"{args.root}/decoder", torch_dtype=torch.float32)
    t_decoder = time.perf_counter() - t0
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    prior_loop, decoder_loop = LoopClock(prior.prior), LoopClock(decoder.decoder)
    timesteps = None if args.prior_steps else list(w.DEFAULT_STAGE_C_TIMESTEPS)
    prior_steps = args.prior_steps or len(w.DEFAULT_STAGE_C_TIMESTEPS) - 1

    runs = []
    for i in range(args.warmup + args.runs):
        g = torch.Generator("cpu").manual_seed(0)
        t0 = time.perf_counter()
        emb = prior(prompt="a photo of a cat", width=args.width, height=args.height,
                    num_inference_steps=prior_steps, timesteps=timesteps, guidance_scale=args.prior_guidance,
                    generator=g, output_type="pt", callback_on_step_end=prior_loop.step_end).image_embeddings
        t1 = time.perf_counter()
        # the decoder pipeline's own timing includes the VQGAN; time it apart with output_type="latent"
        lat = decoder(image_embeddings=emb, prompt="a photo of a cat", num_inference_steps=args.decoder_steps,
                      guidance_scale=0.0, generator=g, output_type="latent",
                      callback_on_step_end=decoder_loop.step_end).images
        t2 = time.perf_counter()
        img = decoder.vqgan.decode(lat * decoder.vqgan.config.scale_factor).sample.clamp(0, 1)
        t3 = time.perf_counter()
        loops = (prior_loop.take(), decoder_loop.take())
        if i >= args.warmup:
            runs.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2) + loops)
    med = [statistics.median(r[k] for r in runs) for k in range(6)]
    print(json.dumps({
        "tool": f"diffusers {__import__('diffusers').__version__}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "width": args.width, "height": args.height, "prior_steps": prior_steps, "decoder_steps": args.decoder_steps,
        "import_s": round(t_import, 3),
        "load_s": {"prior": round(t_prior, 3), "decoder": round(t_decoder, 3)},
        "median_s": {"total": round(med[0], 3), "prior": round(med[1], 3), "decoder": round(med[2], 3),
                     "vqgan": round(med[3], 3), "prior_loop": round(med[4], 3), "decoder_loop": round(med[5], 3)},
        "prior_ms_per_step": round(med[1] * 1000 / prior_steps, 3),
        "decoder_ms_per_step": round(med[2] * 1000 / args.decoder_steps, 3),
        "image_mean": float(img.mean()),
    }))


if __name__ == "__main__":
    main()
