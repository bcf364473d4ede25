#!/usr/bin/env bash
# Loading of the published sizes on the CPU: `wuerstchen bench` reads the model files once
# (page_cache_read_s, which also warms the cache), then loads the prior and the decoder and
# reports both beside peak RSS. Usage: benches/loading.sh MODEL_DIR [BINARY...]
# MODEL_DIR holds `prior` and `decoder` (e.g. `wuerstchen tiny-model --size real --out DIR`);
# several binaries alternate, two rounds, f32 and bf16.
set -euo pipefail
dir=$1; shift
bins=("${@:-wuerstchen}")
for round in 1 2; do
  for dtype in f32 bf16; do
    for bin in "${bins[@]}"; do
      "$bin" bench --prior "$dir/prior" --decoder "$dir/decoder" --width 256 --height 256 \
        --prior-steps 1 --decoder-steps 1 --runs 1 --warmup 0 --dtype "$dtype" -q |
        python3 -c "import json, sys; d = json.load(sys.stdin); \
print('$bin', d['dtype'], 'read', d.get('page_cache_read_s'), 'load', d['load_s'], \
'ratio', d.get('load_over_read'), 'peak GiB', round(d['peak_host_bytes'] / 2**30, 2))"
    done
  done
done
