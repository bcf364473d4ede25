#!/usr/bin/env bash
# Proves and measures the CUDA path in one run on a GPU host that has no Rust and no network,
# from the repo root, with gpu-bundle/ made by scripts/gpu-bundle.sh beside the working tree:
#
#   bash scripts/gpu-check.sh                 # on the GPU host (sources gpu-bundle/gpu-env.sh)
#   bash scripts/gpu-check.sh --dry-run       # on a CPU-only machine: the same steps, small
#
# Options:
#   --device D     cuda, cuda:N or cpu (default cuda; --dry-run uses cpu)
#   --bin PATH     the wuerstchen binary (default gpu-bundle/wuerstchen)
#   --out DIR      results: gpu-check.json, steps.jsonl, logs/ (default $OUT, else ./gpu-check-out)
#   --work DIR     scratch space for the model folders (default: the first of /tmp, /dev/shm,
#                  /var/tmp with room for 15 GB; real-size weights want a fast local disk)
#   --python PATH  python with torch (default: $PYTHON, python3, /opt/torch/.venv/bin/python3)
#   --budget S     wall-clock budget in seconds (default 450); a step that would not fit is
#                  recorded as "not run" and the rest go on
#   --dry-run      CPU, tiny model, 256x256, 3 + 3 steps (step 2b keeps the prior's 29), one
#                  run each; diffusers' tiny config on the CPU stands in for the GPU baseline;
#                  the numbers only show that every step works
#
# Steps (estimates for an H200 host, ~9 minutes in all, more than the budget; each runs
# under `timeout`, a failure is recorded and the next step still runs; every step appends one
# line to steps.jsonl; what does not fit is dropped from the end, the 1024x1536 diffusers
# line first):
#   1. wuerstchen tiny-model --size real: 12.5 GB of random f32 weights in the Hub layout
#      (~60-90 s on one core, in the background while steps 2 and 4 run)
#   2. wuerstchen selftest --dtype bf16, f16, f32 --shapes all --json (~20-30 s each, most of
#      it the CPU f32 reference at the real shapes), and bf16 again with the opt-in fused CUDA
#      kernels, attention and CUDA graphs
#   2b. once step 1's weights exist: wuerstchen prior, "a photo of a cat", seed 1, 1024x1024,
#      the default schedule (29 steps, guidance 4), in f32, bf16 and f16; the relative error
#      ||x - f32|| / ||f32|| of the bf16 and f16 image embeddings, target <= 2e-2 (~3 x (29
#      steps at ~40 ms + ~15 s to load the prior and start CUDA) = ~50 s; 60 s limit each)
#   3. wuerstchen bench at 1024x1024 bf16 and f16, batch 1 and 4, and 1024x1536 bf16 batch 1;
#      bf16 batch 1 also with the fused kernels, then also the fused attention, then also CUDA
#      graphs
#      (~15-30 s each at ~2 s per image; the run counts shrink when the first line is slower)
#   4. diffusers' GPU baseline (gpu-bundle/diffusers-bench): the same 1024x1024 workload, bf16
#      and fp16, batch 1 and 4, on its own random weights of the same architecture (~100 s;
#      started while step 1 still writes when that saves time); 1024x1536 bf16 batch 1 at the
#      end if time is left (~45 s)
#   5. cold start, wall clock from outside: wuerstchen generate against diffusers'
#      coldstart.py run on the same folders, alternated, twice each, page cache warm (~70 s)
#   6. the CPU with every core, then with half of them: tiny-model --size mid, wuerstchen bench
#      against benches/diffusers_cpu.py at 512x512, alternated, two rounds each (~25 s each)
# Then one markdown table, printed last, and gpu-check.json with everything.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; }

DEVICE="" BIN="gpu-bundle/wuerstchen" DRY=0 OUT_DIR="${OUT:-}" WORK="" PY="${PYTHON:-}" BUDGET=450
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value}"; shift 2 ;;
    --bin) BIN="${2:?--bin needs a path}"; shift 2 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
    --work) WORK="${2:?--work needs a folder}"; shift 2 ;;
    --python) PY="${2:?--python needs a path}"; shift 2 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "error: --budget takes whole seconds" >&2; exit 2; }
if [[ $DRY -eq 1 ]]; then
  [[ -z "$DEVICE" || "$DEVICE" == cpu ]] || echo "note: --dry-run runs on the CPU, not $DEVICE" >&2
  DEVICE=cpu
fi
DEVICE="${DEVICE:-cuda}"
OUT_DIR="${OUT_DIR:-$root/gpu-check-out}"
mkdir -p "$OUT_DIR/logs" || { echo "error: cannot create $OUT_DIR" >&2; exit 1; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOGS="$OUT_DIR/logs"
RESULTS="$OUT_DIR/steps.jsonl"
: >"$RESULTS"
rm -f "$OUT_DIR"/diffusers-*.json "$OUT_DIR/gpu-check.json" "$LOGS"/*
RESERVE=10 # seconds kept for the summary at the end

log() { printf '[%4ds] %s\n' "$SECONDS" "$*" >&2; }

# The CUDA libraries (a no-op when already sourced).
if [[ "$DEVICE" != cpu && -f gpu-bundle/gpu-env.sh ]]; then
  # shellcheck disable=SC1091
  source gpu-bundle/gpu-env.sh
fi
# no network on the host: nothing may try the Hub
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# the driver's cache of JIT-compiled PTX must hold all of candle's kernels
export CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-4294967296}"

[[ "$BIN" == /* ]] || BIN="$root/$BIN"
# a large (CUDA) binary travels xz-compressed: unpack it once beside itself
if [[ ! -e "$BIN" && -f "$BIN.xz" ]]; then
  if command -v xz >/dev/null 2>&1; then
    xz -dkc "$BIN.xz" >"$BIN.tmp"
  else
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$BIN.xz" "$BIN.tmp"
  fi && chmod +x "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
fi
if [[ ! -x "$BIN" ]]; then
  echo "error: no executable $BIN (run scripts/gpu-bundle.sh first, or pass --bin)" >&2
  exit 1
fi

# python for the JSON bookkeeping (any python 3) and for diffusers (one with torch)
PYJ=""
for p in python3 /opt/torch/.venv/bin/python3 python; do
  if command -v "$p" >/dev/null 2>&1; then PYJ="$(command -v "$p")"; break; fi
done
[[ -n "$PYJ" ]] || { echo "error: no python3 for the bookkeeping" >&2; exit 1; }
PYJ="$("$PYJ" -c 'import sys; print(sys.executable)')" # past any wrapper script: it runs ~40 times
if [[ -z "$PY" ]]; then
  for p in python3 /opt/torch/.venv/bin/python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null; then PY="$(command -v "$p")"; break; fi
  done
fi

# Scratch space: real-size weights need ~13 GB (plus 0.5 GB for the mid model).
need_kib=$(( DRY ? 1 * 1024 * 1024 : 15 * 1024 * 1024 ))
if [[ -z "$WORK" ]]; then
  for d in /tmp /dev/shm /var/tmp "$root"; do
    free_kib=$(df -Pk "$d" 2>/dev/null | awk 'NR==2 {print $4}')
    if [[ -n "$free_kib" && "$free_kib" -ge "$need_kib" && -w "$d" ]]; then WORK="$d/wuerstchen-gpu-check"; break; fi
  done
  [[ -n "$WORK" ]] || { echo "error: no folder with $((need_kib / 1048576)) GiB free; pass --work" >&2; exit 1; }
fi
mkdir -p "$WORK" || { echo "error: cannot create $WORK" >&2; exit 1; }
WORK="$(cd "$WORK" && pwd)"

HELPER="$WORK/gpu-check-helper.py"
cat >"$HELPER" <<'PYEOF'
"""Bookkeeping for scripts/gpu-check.sh: one JSON line per step, then the table and the summary."""
import json, os, sys


def parse_stdout(path):
    """The whole stdout as one JSON value, else the last line that parses as a JSON object."""
    try:
        text = open(path, errors="replace").read()
    except OSError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def tail(path, n=3000):
    try:
        return open(path, errors="replace").read()[-n:]
    except OSError:
        return ""


def record():
    e = os.environ
    step = {
        "id": e["S_ID"], "title": e["S_TITLE"], "status": e["S_STATUS"],
        "rc": int(e["S_RC"]) if e.get("S_RC") else None,
        "wall_s": round(int(e["S_MS"]) / 1000, 3) if e.get("S_MS") else None,
        "limit_s": int(e["S_LIMIT"]) if e.get("S_LIMIT") else None,
        "started_at_s": int(e["S_START"]) if e.get("S_START") else None,
        "cmd": e.get("S_CMD", ""),
    }
    if e.get("S_NOTE"):
        step["note"] = e["S_NOTE"]
    out, err = e.get("S_OUT"), e.get("S_ERR")
    if e.get("S_JSON"):
        try:
            step["result"] = json.load(open(e["S_JSON"]))
        except (OSError, ValueError):
            step["result"] = None
    elif out:
        step["result"] = parse_stdout(out)
    if step["status"] != "ok" and step["status"] != "skipped":
        step["stderr_tail"] = tail(err) if err else ""
        if out and step.get("result") is None:
            step["stdout_tail"] = tail(out)
    with open(sys.argv[2], "a") as f:
        f.write(json.dumps(step) + "\n")


def load(path):
    steps = {}
    for line in open(path):
        if line.strip():
            s = json.loads(line)
            steps[s["id"]] = s
    return steps


def get():
    """get STEPS ID a.b.c: a field of a step's result (empty when absent)."""
    steps = load(sys.argv[2])
    v = steps.get(sys.argv[3], {})
    for k in ["result"] + sys.argv[4].split("."):
        v = v.get(k) if isinstance(v, dict) else None
    print("" if v is None else v)


EMB_TOL = 2e-2  # step 2b: bf16 and f16 image embeddings against f32, relative L2 error


def read_safetensors(path, name):
    """One tensor of a .safetensors file as (shape, list of floats), with plain python: an
    8-byte little-endian header length, the JSON header, then the raw little-endian data."""
    import array, struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        t = header[name]
        begin, end = t["data_offsets"]
        f.seek(8 + n + begin)
        raw = f.read(end - begin)
    dt = t["dtype"]
    if dt == "F32":
        a = array.array("f")
        a.frombytes(raw)
        if sys.byteorder != "little":
            a.byteswap()
        vals = a.tolist()
    elif dt == "F16":
        vals = list(struct.unpack(f"<{len(raw) // 2}e", raw))
    elif dt == "BF16":
        h = struct.unpack(f"<{len(raw) // 2}H", raw)
        vals = list(struct.unpack(f"<{len(h)}f", struct.pack(f"<{len(h)}I", *(x << 16 for x in h))))
    else:
        raise ValueError(f"{path}: {name} has dtype {dt}")
    return t["shape"], vals


def embcompare():
    """embcompare REF DT=PATH...: relative L2 error of each file's image_embeddings against REF's.
    Prints one JSON object; exits 1 when one is over EMB_TOL, not finite or of another shape."""
    import math
    ref_shape, ref = read_safetensors(sys.argv[2], "image_embeddings")
    ref_norm = math.sqrt(sum(v * v for v in ref))
    out = {"reference": "f32", "tensor": "image_embeddings", "shape": ref_shape, "tolerance": EMB_TOL,
           "ref_norm": ref_norm, "ref_finite": all(math.isfinite(v) for v in ref)}
    passed = out["ref_finite"] and ref_norm > 0
    for spec in sys.argv[3:]:
        dt, path = spec.split("=", 1)
        shape, x = read_safetensors(path, "image_embeddings")
        r = {"shape": shape, "nonfinite": sum(1 for v in x if not math.isfinite(v))}
        if shape != ref_shape:
            r.update(rel_err=None, max_abs_err=None, ok=False, why="shape differs from the f32 reference")
        else:
            d = [a - b for a, b in zip(x, ref)]
            err = math.sqrt(sum(v * v for v in d)) / ref_norm if ref_norm > 0 else float("nan")
            mx = max((abs(v) for v in d), default=0.0)
            finite = math.isfinite(err) and r["nonfinite"] == 0 and out["ref_finite"]
            r.update(rel_err=err if finite else None, max_abs_err=mx if math.isfinite(mx) else None,
                     ok=finite and err <= EMB_TOL)
            if not finite:
                r["why"] = "non-finite values"
        passed = passed and r["ok"]
        out[dt] = r
    out["passed"] = passed
    print(json.dumps(out))
    sys.exit(0 if passed else 1)


def cell_missing(step):
    if step is None:
        return "not run"
    st = step["status"]
    if st == "skipped":
        return "not run"
    if st == "timeout":
        return f"timed out ({step.get('limit_s')} s)"
    if st != "ok":
        return f"failed (exit {step.get('rc')})"
    return "n/a"


def num(v, fmt):
    return fmt.format(v) if isinstance(v, (int, float)) else None


def summarize():
    steps_path, meta_path, out_path = sys.argv[2:5]
    steps = load(steps_path)
    meta = json.load(open(meta_path))
    dry = meta["dry_run"]
    rows = []  # (what, ours, diffusers, ratio)

    def ratio(a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            return f"{a / b:.2f}"
        return "-"

    def add(what, ours_v, ours_step, theirs_v, theirs_step, fmt, theirs_note=""):
        o = num(ours_v, fmt) or cell_missing(ours_step)
        if theirs_step == "-":
            t = "-"
        else:
            t = num(theirs_v, fmt)
            t = (t + theirs_note) if t else cell_missing(theirs_step)
        rows.append((what, o, t, ratio(ours_v, theirs_v)))

    def res(sid):
        s = steps.get(sid)
        return (s or {}).get("result") if s else None

    # 1. weights
    s = steps.get("1-weights")
    what = "real-size random weights written (s)" if not dry else "tiny random weights written (s)"
    if s and s["status"] == "ok":
        cell = "reused" if s.get("note", "").startswith("reused") else num(s.get("wall_s"), "{:.1f}")
    else:
        cell = cell_missing(s)
    rows.append((what, cell, "-", "-"))

    # 2. selftests
    for dt in ("bf16", "bf16-fused", "f16", "f32"):
        sid = f"2-selftest-{dt}"
        s, r = steps.get(sid), res(sid)
        if isinstance(r, dict) and isinstance(r.get("results"), list):
            checks = r["results"]
            bad = [c for c in checks if not c.get("ok")]
            errs = [c["rel_err"] / c["tol"] for c in checks
                    if isinstance(c.get("rel_err"), (int, float)) and isinstance(c.get("tol"), (int, float)) and c["tol"] > 0]
            worst = max(errs, default=float("nan"))
            cell = f"{'pass' if r.get('passed') and not bad else 'FAIL'} {len(checks) - len(bad)}/{len(checks)}"
            cell += f", worst err/tol {worst:.2g}"
            if bad:
                cell += "; failed: " + ", ".join(f"{c.get('check')}[{c.get('shape')}]" for c in bad[:6])
                cell += " ..." if len(bad) > 6 else ""
        else:
            cell = cell_missing(s)
        rows.append((f"selftest {dt} (shapes {meta['selftest_shapes']})", cell, "-", "-"))

    # 2b. the prior's image embeddings in half precision against f32
    cmp = res("2b-emb-compare")
    for dt in ("bf16", "f16"):
        r = cmp.get(dt) if isinstance(cmp, dict) else None
        if isinstance(r, dict):
            if isinstance(r.get("rel_err"), (int, float)):
                cell = f"{r['rel_err']:.2e} {'PASS' if r.get('ok') else 'FAIL'}"
            else:
                cell = f"FAIL ({r.get('why', 'no value')})"
        else:  # the first step that did not give its part
            cell = "n/a"
            for sid in ("2b-emb-f32", f"2b-emb-{dt}", "2b-emb-compare"):
                s = steps.get(sid)
                if s is None or s["status"] != "ok" or sid == "2b-emb-compare":
                    cell = f"{cell_missing(s)} ({sid})"
                    break
        rows.append((f"prior embeddings {dt} vs f32 (target <= {EMB_TOL:.0e})".replace("e-0", "e-"), cell, "-", "-"))

    # 3 + 4. GPU pipeline vs diffusers' GPU baseline
    dmap = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}
    for cfg in meta["bench_configs"]:
        sid, label, dt, batch, dsid = cfg["id"], cfg["label"], cfg["dtype"], cfg["batch"], cfg["diffusers_step"]
        s, r = steps.get(sid), res(sid) or {}
        ds = steps.get(dsid) if dsid else None
        drow = None
        if ds and isinstance(ds.get("result"), dict):
            for row in ds["result"].get("rows", []):
                if row.get("dtype") == dmap[dt] and row.get("batch") == batch and not row.get("compiled"):
                    drow = row
        dstep = ds if dsid else "-"
        if drow is not None and "error" in drow:
            drow = None
        nan = ""
        if drow and (drow.get("images_nan") or drow.get("emb_nan")):
            nan = " (NaN output)"
        med = r.get("median_s") or {}
        drow = drow or {}
        add(f"{label}: total s", med.get("total"), s, drow.get("total_s"), dstep, "{:.3f}", nan)
        add(f"{label}: prior ms/step", r.get("prior_ms_per_step"), s, drow.get("prior_ms_per_step"), dstep, "{:.1f}")
        add(f"{label}: decoder ms/step", r.get("decoder_ms_per_step"), s, drow.get("decoder_ms_per_step"), dstep,
            "{:.1f}")
        add(f"{label}: VQGAN s", med.get("vqgan"), s, drow.get("vqgan_s"), dstep, "{:.3f}")
        growth = r.get("device_memory_growth_bytes")
        add(f"{label}: peak device GiB", growth / 2**30 if isinstance(growth, (int, float)) else None, s,
            drow.get("peak_mem_gib"), dstep, "{:.2f}")
        if cfg.get("show_load"):
            load_s = r.get("load_s") or {}
            tot = (load_s.get("prior") or 0) + (load_s.get("decoder") or 0) if load_s else None
            add(f"{label}: load s (prior + decoder, page cache warm)", tot, s, None, "-", "{:.2f}")

    # 5. cold start
    for i in (1, 2):
        so, sd = steps.get(f"5-cold-ours-{i}"), steps.get(f"5-cold-diffusers-{i}")
        ov = so.get("wall_s") if so and so["status"] == "ok" else None
        dv = sd.get("wall_s") if sd and sd["status"] == "ok" else None
        add(f"cold start, whole process, {meta['cold_label']} (run {i}): s", ov, so, dv, sd, "{:.2f}")

    # 6. CPU, per thread count
    for t in meta["cpu_threads"]:
        cpu = {"ours": [], "diffusers": []}
        for key, prefix in (("ours", f"6-cpu-ours-{t}t-"), ("diffusers", f"6-cpu-diffusers-{t}t-")):
            for i in (1, 2):
                r = res(prefix + str(i))
                if isinstance(r, dict) and isinstance(r.get("median_s"), dict):
                    cpu[key].append(r["median_s"])
        so, sd = steps.get(f"6-cpu-ours-{t}t-1"), steps.get(f"6-cpu-diffusers-{t}t-1")
        label = f"CPU {meta['cpu_label']}, {t} thread{'s' if t > 1 else ''}{meta['cpu_steps']}"
        for stage in ("total", "prior", "decoder", "vqgan"):
            ov = min((m[stage] for m in cpu["ours"] if isinstance(m.get(stage), (int, float))), default=None)
            dv = min((m[stage] for m in cpu["diffusers"] if isinstance(m.get(stage), (int, float))), default=None)
            add(f"{label}: {stage} s (min of 2)", ov, so, dv, sd, "{:.3f}")

    summary = {"meta": meta, "prior_embeddings_vs_f32": cmp if isinstance(cmp, dict) else None,
               "steps": list(steps.values()),
               "table": [dict(zip(("measured", "wuerstchen", "diffusers", "ratio"), r)) for r in rows]}
    with open(out_path, "w") as f:
        json.dump(summary, f, indent=1)

    lines = ["| measured | wuerstchen | diffusers | ratio |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    {"record": record, "get": get, "summarize": summarize, "embcompare": embcompare}[sys.argv[1]]()
PYEOF

# step ID TITLE LIMIT_S MIN_S -- CMD...: runs CMD under `timeout` (LIMIT_S, cut to what is
# left of the budget), records the outcome, and returns CMD's exit code (3: not run).
# STEP_JSON (a file holding the result) and STEP_NOTE may be set for the call.
record() { # record ID TITLE STATUS RC MS LIMIT START OUT ERR CMD
  S_ID="$1" S_TITLE="$2" S_STATUS="$3" S_RC="$4" S_MS="$5" S_LIMIT="$6" S_START="$7" S_OUT="$8" S_ERR="$9" \
    S_CMD="${10}" S_JSON="${STEP_JSON:-}" S_NOTE="${STEP_NOTE:-}" "$PYJ" "$HELPER" record "$RESULTS"
}
step() {
  local id="$1" title="$2" limit="$3" min="$4"
  shift 5
  local cmd
  cmd="$(printf '%q ' "$@")"
  local left=$(( BUDGET - SECONDS - RESERVE ))
  local lim=$(( limit < left ? limit : left ))
  if (( lim < min )); then
    log "$id: not run (${left} s of the budget left, it needs ${min} s)"
    STEP_NOTE="not run: ${left} s of the budget left, the step needs at least ${min} s${STEP_NOTE:+; $STEP_NOTE}" \
      record "$id" "$title" skipped "" "" "$limit" "$SECONDS" "" "" "$cmd"
    return 3
  fi
  local out="$LOGS/$id.out" err="$LOGS/$id.err" start=$SECONDS t0
  log "$id: $title (limit ${lim} s)"
  t0=$(date +%s%N)
  timeout -k 5 "$lim" "$@" >"$out" 2>"$err" </dev/null
  local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  local status=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timeout; elif [[ $rc -ne 0 ]]; then status=failed; fi
  log "$id: $status (exit $rc, $(( ms / 1000 )).$(( ms % 1000 / 100 )) s)"
  [[ $status == ok ]] || tail -n 3 "$err" | sed 's/^/    /' >&2
  record "$id" "$title" "$status" "$rc" "$ms" "$lim" "$start" "$out" "$err" "$cmd"
  return $rc
}
skip() { # skip ID TITLE REASON
  log "$1: not run ($3)"
  STEP_NOTE="not run: $3" record "$1" "$2" skipped "" "" "" "$SECONDS" "" "" ""
}
get() { "$PYJ" "$HELPER" get "$RESULTS" "$1" "$2"; }
status_of() { "$PYJ" -c 'import json,sys
for l in open(sys.argv[1]):
    s = json.loads(l)
    if s["id"] == sys.argv[2]: print(s["status"])' "$RESULTS" "$1"; }

# ---------------------------------------------------------------------------------------------
# the workload
if [[ $DRY -eq 1 ]]; then
  MODEL_SIZE=tiny W=256 H=256 H_TALL=384 SHAPES=small
  RUNS_B1="--warmup 0 --runs 1" STEPS=(--prior-steps 3 --decoder-steps 3)
  CPU_SIZE=256 COLD_SIZE=256 COLD_DTYPE_OURS=f32 COLD_DTYPE_THEIRS=fp32 CPU_STEPS=", 3 + 3 steps"
else
  MODEL_SIZE=real W=1024 H=1024 H_TALL=1536 SHAPES=all
  RUNS_B1="--warmup 1 --runs 3" STEPS=()
  CPU_SIZE=512 COLD_SIZE=1024 COLD_DTYPE_OURS=bf16 COLD_DTYPE_THEIRS=bf16 CPU_STEPS=""
fi
M="$WORK/$MODEL_SIZE"
MID="$WORK/mid"
THREADS=$(nproc)
BENCH_DIR="$root/gpu-bundle/diffusers-bench"

gpu_name=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_name="$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
fi
log "device $DEVICE, binary $BIN, out $OUT_DIR, scratch $WORK, budget ${BUDGET} s${gpu_name:+, GPU: $gpu_name}"
if [[ "$DEVICE" != cpu ]] && command -v ldd >/dev/null 2>&1 && ldd "$BIN" 2>/dev/null | grep -q "not found"; then
  log "warning: libraries not found (source gpu-bundle/gpu-env.sh?):"
  ldd "$BIN" | grep "not found" | sed 's/^/    /' >&2
fi

# ---------------------------------------------------------------------------------------------
# 1 (background). The model folders: real size (or tiny) for steps 3 and 5, mid for step 6.
# Single-threaded random numbers: ~60 s for the real size on an H200 host, ~5 s for mid.
# A folder is reused when the same binary wrote it (a warm host running the check again).
bin_sum="$(cksum <"$BIN" | cut -d' ' -f1)"
weights_job() { # weights_job ID DIR SIZE LIMIT
  local id="$1" dir="$2" size="$3" limit="$4"
  if [[ "$(cat "$dir/.complete" 2>/dev/null)" == "$bin_sum" && -f "$dir/prior/model_index.json" &&
    -f "$dir/decoder/model_index.json" ]]; then
    STEP_NOTE="reused from an earlier run" record "$id" "wuerstchen tiny-model --size $size (reused)" ok 0 0 "" \
      "$SECONDS" "" "" ""
    log "$id: reused $dir"
    return 0
  fi
  rm -f "$dir/.complete"
  step "$id" "wuerstchen tiny-model --size $size" "$limit" 20 -- \
    "$BIN" -q tiny-model --size "$size" --out "$dir" --overwrite && echo "$bin_sum" >"$dir/.complete"
}
weights_job 1-weights "$M" "$MODEL_SIZE" 240 &
pid_weights=$!
weights_job 6-mid-model "$MID" mid 120 &
pid_mid=$!

# diffusers for steps 4-6: the host's own, else the carried wheels into /tmp/site (as
# run_diffusers.sh does). In the background (~15 s of imports), while step 2 uses the GPU.
py_setup() {
  local native=0 ok=0 cuda=0 site=0
  if [[ -n "$PY" ]]; then
    if "$PY" -c "import diffusers" 2>/dev/null; then
      native=1 ok=1
    elif [[ -d "$BENCH_DIR/whl" ]]; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$BENCH_DIR"/whl/*.whl >"$LOGS/pip.log" 2>&1 ||
        "$PY" -c "import glob,zipfile,sys; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob(sys.argv[1]+'/whl/*.whl')]" "$BENCH_DIR"
      site=1
      PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} "$PY" -c "import diffusers" 2>>"$LOGS/pip.log" && ok=1
    fi
    if [[ "$DEVICE" != cpu ]]; then
      "$PY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && cuda=1
    fi
  fi
  echo "diffusers_native=$native diffusers_ok=$ok torch_cuda=$cuda diffusers_site=$site" >"$WORK/py-setup.env"
}
rm -f "$WORK/py-setup.env"
py_setup &
pid_py=$!

# ---------------------------------------------------------------------------------------------
# 2. selftest: every op on the device against the CPU f32 kernel (~10-20 s each, PTX JIT first)
# bf16-fused: the same with every opt-in GPU path (WUERSTCHEN_FUSED_CUDA=1,
# WUERSTCHEN_FUSED_ATTENTION=1, WUERSTCHEN_CUDA_GRAPHS=1: its pipeline check captures and
# replays the sampling loop; WUERSTCHEN_PINNED_UPLOAD=1: its weights_file check spans several
# staging buffers); passing here is what lets them become the default
shapes="$SHAPES" limit=90
for variant in bf16 bf16-fused f16 f32; do
  dt="${variant%-fused}" fused=$([[ $variant == *-fused ]] && echo 1 || echo 0)
  STEP_NOTE="$([[ $shapes == "$SHAPES" ]] || echo "shapes $shapes: an earlier selftest timed out")" \
    step "2-selftest-$variant" "wuerstchen selftest --dtype $dt$([[ $fused == 1 ]] && echo ", fused CUDA kernels")" "$limit" 10 -- \
    env WUERSTCHEN_FUSED_CUDA=$fused WUERSTCHEN_FUSED_ATTENTION=$fused WUERSTCHEN_CUDA_GRAPHS=$fused \
    WUERSTCHEN_PINNED_UPLOAD=$fused \
    "$BIN" -q selftest --device "$DEVICE" --dtype "$dt" --shapes "$shapes" --json
  rc=$?
  # a hang or a very slow device: keep the rest short
  [[ $rc -ne 124 && $rc -ne 137 ]] || { shapes=small limit=45; }
done

# ---------------------------------------------------------------------------------------------
# 4. diffusers' GPU baseline (own random weights, same architecture): ~90 s for bf16 + fp16 at
# batch 1 and 4 (import ~12 s, building each pipeline ~5 s, 7 pipeline calls per line).
wait "$pid_py"
diffusers_native=0 diffusers_ok=0 torch_cuda=0 diffusers_site=0
# shellcheck disable=SC1091
[[ ! -f "$WORK/py-setup.env" ]] || source "$WORK/py-setup.env"
[[ $diffusers_site -eq 0 ]] || export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
log "python: ${PY:-none}; diffusers importable: $diffusers_ok$([[ $diffusers_site -eq 0 ]] || echo " (carried wheels)"); torch sees CUDA: $torch_cuda"
diffusers_args=()
diffusers_runner=()
step4_note=""
if [[ ! -f "$BENCH_DIR/device_baseline.py" ]]; then
  step4_reason="gpu-bundle/diffusers-bench is missing"
elif [[ -z "$PY" ]]; then
  step4_reason="no python with torch"
elif [[ $DRY -eq 1 ]]; then
  step4_reason=""
  step4_note="dry run: diffusers' tiny config on the CPU stands in for the GPU baseline"
  diffusers_args=(--config tiny --device cpu --threads "$THREADS" --prior-timesteps "1.0,0.6667,0.3333,0.0"
    --decoder-steps 3)
elif [[ $torch_cuda -eq 0 ]]; then
  step4_reason="torch sees no CUDA device"
else
  step4_reason=""
fi
if [[ $diffusers_native -eq 1 ]]; then
  diffusers_runner=("$PY" "$BENCH_DIR/device_baseline.py")
else
  diffusers_runner=(env PYTHON="$PY" bash "$BENCH_DIR/run_diffusers.sh")
fi
run_diffusers_1024() {
  local note="$step4_note"
  if kill -0 "$pid_weights" 2>/dev/null; then
    note="${note:+$note; }ran while step 1 still wrote weights on one core"
    step4_overlap=1
  fi
  if [[ -n "$step4_reason" ]]; then
    skip 4-diffusers "diffusers GPU baseline ${W}x${H}" "$step4_reason"
    return
  fi
  local runs="--runs 3 --warmup 1" limit=200
  [[ $DRY -eq 0 ]] || runs="--runs 1 --warmup 0"
  # shellcheck disable=SC2086
  STEP_JSON="$OUT_DIR/diffusers-${W}x${H}.json" STEP_NOTE="$note" DIFFUSERS_TIMEOUT_S=$limit \
    step 4-diffusers "diffusers GPU baseline ${W}x${H}, bf16 + fp16, batch 1 and 4" "$limit" 60 -- \
    "${diffusers_runner[@]}" ${diffusers_args[@]+"${diffusers_args[@]}"} --dtypes bf16,fp16 --batch-sizes 1,4 \
    --height "$H" --width "$W" $runs --budget-s $(( limit - 60 )) --json "$OUT_DIR/diffusers-${W}x${H}.json"
}
step4_done=0 step4_overlap=0
if kill -0 "$pid_weights" 2>/dev/null; then
  # the weights are still being written: use the GPU meanwhile
  run_diffusers_1024
  step4_done=1
fi

wait "$pid_weights"
wait "$pid_mid"
weights_ok=0
[[ "$(status_of 1-weights)" == ok ]] && weights_ok=1

# ---------------------------------------------------------------------------------------------
# 2b. Half precision end to end: the prior's image embeddings in f32, bf16 and f16 from the same
# prompt, seed and schedule on step 1's weights, then ||x - f32|| / ||f32|| for bf16 and f16,
# target <= 2e-2. ~15-20 s a run: loading the prior (GBs of f32 on disk) and starting CUDA
# dominate 29 steps at ~40 ms. The dry run keeps the default schedule too (29 steps, guidance 4;
# ~0.3 s a run on the tiny model): the error depends on it (3 steps: bf16 ~0.11 there, 29: ~0.01).
emb_files=()
for dt in f32 bf16 f16; do
  title="wuerstchen prior ${W}x${H} $dt, 29 steps"
  if [[ $weights_ok -eq 0 ]]; then
    skip "2b-emb-$dt" "$title" "no model folders (step 1 failed)"
    continue
  elif [[ $dt != f32 && "$(status_of 2b-emb-f32)" != ok ]]; then
    skip "2b-emb-$dt" "$title" "no f32 reference (2b-emb-f32 did not succeed)"
    continue
  fi
  rm -f "$WORK/emb-$dt.safetensors"
  step "2b-emb-$dt" "$title" 60 15 -- \
    "$BIN" -q prior --prior "$M/prior" --prompt "a photo of a cat" --seed 1 --width "$W" --height "$H" \
    --device "$DEVICE" --dtype "$dt" -o "$WORK/emb-$dt.safetensors" --overwrite --json
  [[ $dt == f32 || "$(status_of "2b-emb-$dt")" != ok ]] || emb_files+=("$dt=$WORK/emb-$dt.safetensors")
done
if [[ ${#emb_files[@]} -eq 0 ]]; then
  skip 2b-emb-compare "prior embeddings bf16 and f16 vs f32" "no embeddings to compare"
else
  step 2b-emb-compare "prior embeddings bf16 and f16 vs f32 (relative L2 error, target <= 2e-2)" 30 2 -- \
    "$PYJ" "$HELPER" embcompare "$WORK/emb-f32.safetensors" "${emb_files[@]}"
fi

# ---------------------------------------------------------------------------------------------
# 3. wuerstchen bench (~15-30 s each with loading at ~2 s per image; fewer runs when slower)
# FUSED=1 before the call: with the opt-in fused CUDA kernels for the depthwise conv, GRN,
# layer norm and transposed conv, and weights uploaded through pinned staging buffers (its
# load_s against the first line's); FUSED=2: also the fused attention; FUSED=3: also CUDA graphs
bench() { # bench ID LABEL DTYPE WIDTH HEIGHT NUM_IMAGES LIMIT RUNS...
  local id="$1" label="$2" dt="$3" w="$4" h="$5" n="$6" limit="$7"
  shift 7
  if [[ $weights_ok -eq 0 ]]; then
    skip "$id" "wuerstchen bench $label" "no model folders (step 1 failed)"
    return
  fi
  step "$id" "wuerstchen bench $label" "$limit" 20 -- \
    env WUERSTCHEN_FUSED_CUDA=$(( ${FUSED:-0} > 0 )) WUERSTCHEN_PINNED_UPLOAD=$(( ${FUSED:-0} > 0 )) \
    WUERSTCHEN_FUSED_ATTENTION=$(( ${FUSED:-0} > 1 )) \
    WUERSTCHEN_CUDA_GRAPHS=$(( ${FUSED:-0} > 2 )) "$BIN" -q bench --prior "$M/prior" --decoder "$M/decoder" --device "$DEVICE" --dtype "$dt" \
    --width "$w" --height "$h" --num-images "$n" ${STEPS[@]+"${STEPS[@]}"} "$@"
}
# Run counts for the later lines from the first one's seconds per image (e) and load time (l):
# a line expected to take r*e per run gets warm-up + runs that fit in its limit.
plan_runs() { # plan_runs SCALE LIMIT MAX_RUNS -> "--warmup A --runs B" or "" (does not fit)
  local scale="$1" limit="$2" max="$3"
  local e l
  e="$(get 3-bench-bf16-b1 median_s.total)"
  l="$(get 3-bench-bf16-b1 load_s.prior)"
  local l2
  l2="$(get 3-bench-bf16-b1 load_s.decoder)"
  if [[ -z "$e" ]]; then echo "--warmup 1 --runs 1"; return; fi
  "$PYJ" -c 'import sys
e, l, scale, limit, mx = float(sys.argv[1]), float(sys.argv[2] or 0) + float(sys.argv[3] or 0) + 3, *map(float, sys.argv[4:])
n = int((limit * 0.85 - l) // max(e * scale, 1e-3))
print("" if n < 1 else "--warmup 0 --runs 1" if n == 1 else f"--warmup 1 --runs {min(n - 1, int(mx))}")' \
    "$e" "$l" "$l2" "$scale" "$limit" "$max"
}
bench_configs='[]'
add_config() { # add_config ID LABEL DTYPE BATCH DIFFUSERS_STEP SHOW_LOAD
  bench_configs="$("$PYJ" -c 'import json,sys
c = json.loads(sys.argv[1]); c.append(dict(id=sys.argv[2], label=sys.argv[3], dtype=sys.argv[4], batch=int(sys.argv[5]),
    diffusers_step=sys.argv[6] or None, show_load=sys.argv[7] == "1")); print(json.dumps(c))' \
    "$bench_configs" "$@")"
}
# shellcheck disable=SC2086
bench 3-bench-bf16-b1 "${W}x${H} bf16 batch 1" bf16 "$W" "$H" 1 120 $RUNS_B1
add_config 3-bench-bf16-b1 "${W}x${H} bf16 batch 1" bf16 1 4-diffusers 1
for spec in "bf16 1 fused" "bf16 1 fused-attention" "bf16 1 graphs" "f16 1 1" "bf16 4 4" "f16 4 4" "bf16 1 tall"; do
  read -r dt n kind <<<"$spec"
  FUSED=0
  if [[ $kind == fused ]]; then
    id="3-bench-bf16-b1-fused" label="${W}x${H} bf16 batch 1, fused CUDA kernels, pinned upload" h=$H scale=1 maxr=3
    dstep=4-diffusers FUSED=1
  elif [[ $kind == fused-attention ]]; then
    id="3-bench-bf16-b1-fused-attn" label="${W}x${H} bf16 batch 1, fused CUDA kernels and attention" h=$H scale=1
    maxr=3 dstep=4-diffusers FUSED=2
  elif [[ $kind == graphs ]]; then
    id="3-bench-bf16-b1-graphs" label="${W}x${H} bf16 batch 1, fused kernels, attention and CUDA graphs" h=$H
    scale=1 maxr=3 dstep=4-diffusers FUSED=3
  elif [[ $kind == tall ]]; then
    id="3-bench-bf16-tall" label="${W}x${H_TALL} bf16 batch 1" h=$H_TALL n=1 scale=1.6 maxr=2 dstep=4-diffusers-tall
  else
    id="3-bench-$dt-b$n" label="${W}x${H} $dt batch $n" h=$H scale=$(( n == 1 ? 1 : 4 )) maxr=$(( n == 1 ? 3 : 2 ))
    dstep=4-diffusers
  fi
  add_config "$id" "$label" "$dt" "$n" "$dstep" 0
  first="$(status_of 3-bench-bf16-b1)"
  if [[ $first == timeout || $first == skipped ]]; then
    skip "$id" "wuerstchen bench $label" "the first bench line was $([[ $first == timeout ]] && echo "too slow (timed out)" || echo "not run")"
    continue
  elif [[ $DRY -eq 1 || $first != ok ]]; then
    runs="--warmup 0 --runs 1"
  else
    runs="$(plan_runs "$scale" 75 "$maxr")"
  fi
  if [[ -z "$runs" ]]; then
    skip "$id" "wuerstchen bench $label" "one run would not fit in 75 s at the measured speed"
    continue
  fi
  # shellcheck disable=SC2086
  bench "$id" "$label" "$dt" "$W" "$h" "$n" 75 $runs
done

[[ $step4_done -eq 1 ]] || run_diffusers_1024

# ---------------------------------------------------------------------------------------------
# 5. Cold start from outside, alternated, page cache warm (ours ~10-15 s, diffusers ~20 s each).
coldstart_py="$BENCH_DIR/coldstart.py"
cold_theirs=()
if [[ -f "$coldstart_py" ]]; then
  cold_theirs=("$PY" "$coldstart_py" run "$M" --device "$([[ $DEVICE == cpu ]] && echo cpu || echo cuda)"
    --dtype "$COLD_DTYPE_THEIRS" --size "$COLD_SIZE" --prompt "a photo of a cat" --out "$WORK/cold-diffusers.png")
  [[ "$DEVICE" != cuda:* ]] || cold_theirs[5]="$DEVICE"
else # the repo's own equivalent
  cold_theirs=("$PY" benches/diffusers_coldstart.py --root "$M" --width "$COLD_SIZE" --height "$COLD_SIZE"
    --device "$DEVICE" --dtype "$([[ $COLD_DTYPE_THEIRS == bf16 ]] && echo bfloat16 || echo float32)"
    --out "$WORK/cold-diffusers.png")
fi
for i in 1 2; do
  if [[ $weights_ok -eq 0 ]]; then
    skip "5-cold-ours-$i" "cold start: wuerstchen generate" "no model folders (step 1 failed)"
    skip "5-cold-diffusers-$i" "cold start: diffusers" "no model folders (step 1 failed)"
    continue
  fi
  # the second run uploads through the pinned staging buffers
  pinned=$(( i == 2 ))
  step "5-cold-ours-$i" "cold start: wuerstchen generate ${COLD_SIZE}x${COLD_SIZE} $COLD_DTYPE_OURS$([[ $pinned == 1 ]] && echo ", pinned upload")" 90 15 -- \
    env WUERSTCHEN_PINNED_UPLOAD=$pinned "$BIN" -q generate --prior "$M/prior" --decoder "$M/decoder" --prompt "a photo of a cat" \
    --width "$COLD_SIZE" --height "$COLD_SIZE" --seed 1 --device "$DEVICE" --dtype "$COLD_DTYPE_OURS" \
    -o "$WORK/cold-ours.png" --overwrite
  if [[ $diffusers_ok -eq 0 ]]; then
    skip "5-cold-diffusers-$i" "cold start: diffusers" "diffusers cannot be imported"
  else
    step "5-cold-diffusers-$i" "cold start: diffusers ${COLD_SIZE}x${COLD_SIZE} $COLD_DTYPE_THEIRS" 90 20 -- \
      "${cold_theirs[@]}"
  fi
done

# ---------------------------------------------------------------------------------------------
# 6. The CPU with every core, then half of them (a GPU host's 16 and 8), mid model,
# alternated (ours ~5 s, diffusers ~12 s per call at 16 threads).
CPU_THREADS=("$THREADS")
(( THREADS < 2 )) || CPU_THREADS+=($(( THREADS / 2 )))
mid_status="$(status_of 6-mid-model)" # its job was waited for above
for t in "${CPU_THREADS[@]}"; do
  cpu_env=(env RAYON_NUM_THREADS="$t" OMP_NUM_THREADS="$t")
  for i in 1 2; do
    if [[ "$mid_status" != ok ]]; then
      skip "6-cpu-ours-${t}t-$i" "CPU bench: wuerstchen" "no mid model folders"
      skip "6-cpu-diffusers-${t}t-$i" "CPU bench: diffusers" "no mid model folders"
      continue
    fi
    step "6-cpu-ours-${t}t-$i" "CPU bench: wuerstchen, mid ${CPU_SIZE}x${CPU_SIZE}, $t threads" 90 15 -- \
      "${cpu_env[@]}" "$BIN" -q bench --device cpu --dtype f32 --prior "$MID/prior" --decoder "$MID/decoder" \
      --width "$CPU_SIZE" --height "$CPU_SIZE" ${STEPS[@]+"${STEPS[@]}"} --warmup 1 --runs 1
    if [[ $diffusers_ok -eq 0 ]]; then
      skip "6-cpu-diffusers-${t}t-$i" "CPU bench: diffusers" "diffusers cannot be imported"
    else
      step "6-cpu-diffusers-${t}t-$i" "CPU bench: diffusers, mid ${CPU_SIZE}x${CPU_SIZE}, $t threads" 90 20 -- \
        "${cpu_env[@]}" "$PY" benches/diffusers_cpu.py --root "$MID" --width "$CPU_SIZE" --height "$CPU_SIZE" \
        --threads "$t" ${STEPS[@]+"${STEPS[@]}"} --warmup 1 --runs 1
    fi
  done
done

# ---------------------------------------------------------------------------------------------
# 4 (if time is left). diffusers at the tall size, bf16 batch 1 (~45 s)
if [[ -n "$step4_reason" ]]; then
  skip 4-diffusers-tall "diffusers GPU baseline ${W}x${H_TALL}" "$step4_reason"
else
  truns="--runs 3 --warmup 1"
  [[ $DRY -eq 0 ]] || truns="--runs 1 --warmup 0"
  # shellcheck disable=SC2086
  STEP_JSON="$OUT_DIR/diffusers-${W}x${H_TALL}.json" STEP_NOTE="$step4_note" DIFFUSERS_TIMEOUT_S=90 \
    step 4-diffusers-tall "diffusers GPU baseline ${W}x${H_TALL}, bf16, batch 1" 90 45 -- \
    "${diffusers_runner[@]}" ${diffusers_args[@]+"${diffusers_args[@]}"} --dtypes bf16 --batch-sizes 1 \
    --height "$H_TALL" --width "$W" $truns --budget-s 30 --json "$OUT_DIR/diffusers-${W}x${H_TALL}.json"
fi

# ---------------------------------------------------------------------------------------------
# The summary: gpu-check.json and the table, last.
bin_version="$("$BIN" --version 2>/dev/null | head -1)"
bundle_build=""
[[ ! -f "$(dirname "$BIN")/BUILD" ]] || bundle_build="$(tr '\n' ' ' <"$(dirname "$BIN")/BUILD")"
META="$WORK/meta.json"
M_DRY=$DRY M_DEVICE="$DEVICE" M_GPU="$gpu_name" M_BIN="$bin_version" M_BUNDLE="$bundle_build" M_THREADS=$THREADS \
  M_BUDGET=$BUDGET M_WALL=$SECONDS M_MODEL="$MODEL_SIZE" M_W=$W M_H=$H M_HT=$H_TALL M_SHAPES="$SHAPES" \
  M_COLD="${COLD_SIZE}x${COLD_SIZE} ${COLD_DTYPE_OURS}" M_CPU="mid ${CPU_SIZE}x${CPU_SIZE}" M_CPU_STEPS="$CPU_STEPS" \
  M_CPU_THREADS="${CPU_THREADS[*]}" \
  M_CONFIGS="$bench_configs" "$PYJ" - "$META" <<'PYEOF'
import json, os, sys, time
e = os.environ
meta = {
    "dry_run": e["M_DRY"] == "1", "device": e["M_DEVICE"], "gpu": e["M_GPU"] or None,
    "binary": e["M_BIN"], "bundle": e["M_BUNDLE"].strip() or None,
    "host_threads": int(e["M_THREADS"]), "budget_s": int(e["M_BUDGET"]), "wall_s": int(e["M_WALL"]),
    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "model": e["M_MODEL"], "width": int(e["M_W"]), "height": int(e["M_H"]), "tall_height": int(e["M_HT"]),
    "selftest_shapes": e["M_SHAPES"], "cold_label": e["M_COLD"], "cpu_label": e["M_CPU"],
    "cpu_steps": e["M_CPU_STEPS"], "cpu_threads": [int(t) for t in e["M_CPU_THREADS"].split()],
    "diffusers_weights": "steps 3 vs 4: diffusers builds its own random weights of the same architecture"
                         " (device_baseline.py has no weights folder option); steps 5 and 6 load the same folders",
    "bench_configs": json.loads(e["M_CONFIGS"]),
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PYEOF
table="$("$PYJ" "$HELPER" summarize "$RESULTS" "$META" "$OUT_DIR/gpu-check.json")"
failed="$("$PYJ" -c 'import json,sys
print(" ".join(json.loads(l)["id"] for l in open(sys.argv[1]) if json.loads(l)["status"] in ("failed", "timeout")))' "$RESULTS")"
skipped="$("$PYJ" -c 'import json,sys
print(" ".join(json.loads(l)["id"] for l in open(sys.argv[1]) if json.loads(l)["status"] == "skipped"))' "$RESULTS")"

echo
if [[ $DRY -eq 1 ]]; then
  echo "DRY RUN on the CPU ($THREADS threads): tiny model at ${W}x${H}; the numbers only show that each step works."
else
  echo "GPU: ${gpu_name:-unknown}; device $DEVICE; binary: $bin_version${bundle_build:+ ($bundle_build)}"
fi
echo "Ratio = wuerstchen / diffusers (below 1: wuerstchen is faster or smaller)."
echo "Steps 3 vs 4: diffusers uses its own random weights of the same architecture; steps 5 and 6 load the same folders."
[[ -z "$step4_note" ]] || echo "Step 4: $step4_note."
[[ $step4_overlap -eq 0 ]] || echo "Step 4 ran while step 1 still wrote the weights on one core."
[[ -z "$skipped" ]] || echo "Not run: $skipped (reasons in gpu-check.json)."
[[ -z "$failed" ]] || echo "Failed or timed out: $failed (stderr tails in gpu-check.json, logs in $LOGS)."
echo "Wall time: ${SECONDS} s of a ${BUDGET} s budget. Full results: $OUT_DIR/gpu-check.json"
echo
echo "$table"
[[ -z "$failed" ]]
