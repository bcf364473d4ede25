#!/usr/bin/env python3
"""Runs `wuerstchen bench` and benches/diffusers_cpu.py alternately on the same model folders,
sizes, steps and thread counts, and prints the min and median of each tool's per-stage
medians. Alternating and taking minima copes with noisy shared machines. Several
`--wuerstchen` binaries (say, builds before and after a change) alternate with diffusers in
each round, each named by its path.

    wuerstchen tiny-model --size mid --out /tmp/mid
    python benches/compare_cpu.py --root /tmp/mid --size 512 --threads 1 2 --rounds 3 \\
        --wuerstchen target/release/wuerstchen

Per step at the published sizes (diffusers' `prior_loop` and `decoder_loop` stages are its
sampling loops without the text encoders, what our `prior` and `decoder` stages time):

    python benches/compare_cpu.py --root /tmp/real --size 1024 --height 1536 --steps 1 1 \\
        --warmup 0 --threads 2 --rounds 3 --wuerstchen target/release/wuerstchen
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd, env):
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--size", type=int, default=512, help="width, and height unless --height")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--steps", type=int, nargs=2, metavar=("PRIOR", "DECODER"), default=None,
                    help="evenly spaced steps per stage (default: each tool's default schedule)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before each timed one, both tools")
    ap.add_argument("--wuerstchen", nargs="+", default=["wuerstchen"])
    args = ap.parse_args()
    height = args.height or args.size
    size = ["--width", str(args.size), "--height", str(height)]
    steps = ["--prior-steps", str(args.steps[0]), "--decoder-steps", str(args.steps[1])] if args.steps else []
    results = {}
    for t in args.threads:
        env = dict(os.environ, RAYON_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
        ours_args = ["bench", "-q", "--device", "cpu", "--prior", f"{args.root}/prior",
                     "--decoder", f"{args.root}/decoder", "--runs", "1", "--warmup", str(args.warmup)] + size + steps
        theirs_cmd = [sys.executable, os.path.join(HERE, "diffusers_cpu.py"), "--root", args.root,
                      "--threads", str(t), "--runs", "1", "--warmup", str(args.warmup)] + size + steps
        tools = [(name if len(args.wuerstchen) > 1 else "wuerstchen", [name] + ours_args) for name in args.wuerstchen]
        for _ in range(args.rounds):
            for name, cmd in tools + [("diffusers", theirs_cmd)]:
                r = run(cmd, env)["median_s"]
                for stage, v in r.items():
                    results.setdefault((t, name, stage), []).append(v)
    rows = []
    for (t, name, stage), v in sorted(results.items()):
        rows.append({"threads": t, "tool": name, "stage": stage, "min_s": min(v), "median_s": statistics.median(v),
                     "runs": v})
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
