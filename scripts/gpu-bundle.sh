#!/usr/bin/env bash
# Prepares gpu-bundle/ (git-ignored) for scripts/gpu-check.sh on a GPU host that has no Rust,
# no compiler and no network: a stripped release binary, the diffusers GPU bench and the
# script that puts the CUDA libraries on LD_LIBRARY_PATH there.
#
#   scripts/gpu-bundle.sh --toolchain DIR/toolchain.sh [--bench-dir DIR/diffusers-bench]
#   scripts/gpu-bundle.sh --cpu [--bench-dir DIR]        # a CPU build, for a dry run here
#   scripts/gpu-bundle.sh --binary PATH [--bench-dir DIR] # any binary you built yourself
#
# --toolchain names a script that assembles a CUDA build toolchain and prints its environment
# with --exports (CUDA_ROOT, NVCC, CUDA_COMPUTE_CAP, ...). A `gpu-env.sh` beside it is copied
# into the bundle (override with --env), and so is a `diffusers-bench/` folder beside it unless
# --bench-dir names another. The CUDA build goes to target/cuda so that later builds only
# recompile what changed (the first one takes ~25 minutes on 2 cores).
#
# The bundle travels to the GPU host next to the working tree (benches/diffusers_cpu.py is
# part of the tree); it must stay under 60 MiB.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

toolchain="" bench_dir="" env_script="" binary="" cpu=0
out="gpu-bundle"
limit_mib=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    --toolchain) toolchain="${2:?--toolchain needs a path}"; shift 2 ;;
    --bench-dir) bench_dir="${2:?--bench-dir needs a path}"; shift 2 ;;
    --env) env_script="${2:?--env needs a path}"; shift 2 ;;
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

modes=$(( cpu + (${#toolchain} > 0 ? 1 : 0) + (${#binary} > 0 ? 1 : 0) ))
if [[ $modes -ne 1 ]]; then
  echo "error: give exactly one of --toolchain PATH, --cpu, --binary PATH" >&2
  exit 2
fi
if [[ -n "$toolchain" ]]; then
  [[ -f "$toolchain" ]] || { echo "error: no toolchain script at $toolchain" >&2; exit 2; }
  toolchain_dir="$(cd "$(dirname "$toolchain")" && pwd)"
  [[ -n "$env_script" || ! -f "$toolchain_dir/gpu-env.sh" ]] || env_script="$toolchain_dir/gpu-env.sh"
  [[ -n "$bench_dir" || ! -d "$toolchain_dir/diffusers-bench" ]] || bench_dir="$toolchain_dir/diffusers-bench"
fi
[[ -z "$bench_dir" || -d "$bench_dir" ]] || { echo "error: no folder $bench_dir" >&2; exit 2; }
[[ -z "$env_script" || -f "$env_script" ]] || { echo "error: no file $env_script" >&2; exit 2; }

# 1. the binary
if [[ -n "$toolchain" ]]; then
  cargo fetch
  bash "$toolchain" >/dev/null
  eval "$(bash "$toolchain" --exports)"
  CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
  binary=target/cuda/release/wuerstchen
elif [[ $cpu -eq 1 ]]; then
  binary=target/release/wuerstchen
  [[ -x "$binary" ]] || { echo "error: $binary is missing: run cargo build --release first" >&2; exit 1; }
fi
[[ -x "$binary" ]] || { echo "error: $binary is not an executable file" >&2; exit 2; }

rm -rf "$out"
mkdir -p "$out"
cp "$binary" "$out/wuerstchen"
strip "$out/wuerstchen" 2>/dev/null || echo "warning: strip failed; the binary is copied unstripped" >&2
# a CUDA build embeds candle's kernels as PTX text (~70 MB stripped): xz brings it to ~11 MB,
# and gpu-check.sh unpacks it on the host
if [[ $(stat -c %s "$out/wuerstchen") -gt $(( 32 * 1048576 )) ]]; then
  xz -T0 -6 "$out/wuerstchen"
fi
if [[ -n "$toolchain" ]]; then
  echo "cuda" >"$out/BUILD"
elif [[ $cpu -eq 1 ]]; then
  echo "cpu" >"$out/BUILD"
else
  echo "given: $binary" >"$out/BUILD"
fi
git rev-parse HEAD >>"$out/BUILD" 2>/dev/null || true
git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo "dirty" >>"$out/BUILD"

# 2. the diffusers GPU bench: its scripts and the wheels it installs (no network on the host)
if [[ -n "$bench_dir" ]]; then
  mkdir -p "$out/diffusers-bench"
  for f in coldstart.py device_baseline.py run_diffusers.sh; do
    if [[ -f "$bench_dir/$f" ]]; then
      cp "$bench_dir/$f" "$out/diffusers-bench/"
    else
      echo "warning: $bench_dir has no $f" >&2
    fi
  done
  if [[ -d "$bench_dir/whl" ]]; then
    cp -r "$bench_dir/whl" "$out/diffusers-bench/"
  else
    echo "warning: $bench_dir has no whl/: the host must already have diffusers" >&2
  fi
  chmod -R u+w "$out/diffusers-bench"
else
  echo "note: no --bench-dir: gpu-check.sh will skip the diffusers GPU bench" >&2
fi

# 3. the CUDA library paths for the host
if [[ -n "$env_script" ]]; then
  cp "$env_script" "$out/gpu-env.sh"
  chmod u+w "$out/gpu-env.sh"
fi

bytes=$(du -sb "$out" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "bundle: $out ($(head -1 "$out/BUILD") build), $mib MiB"
find "$out" -maxdepth 2 -mindepth 1 | sort | sed 's/^/  /'
if [[ $bytes -gt $(( limit_mib * 1048576 )) ]]; then
  echo "error: the bundle is $mib MiB, over the $limit_mib MiB limit" >&2
  exit 1
fi
