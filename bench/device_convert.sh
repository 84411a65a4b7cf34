#!/usr/bin/env bash
# The issue-14 device run (BENCHMARKS.md, "Device run"): the conversion bench on the H100 machine of the
# device tool, from the repository root. mmengine-lite and its pure-Python deps (and a py-spy binary for
# the optional profile) travel in .devdeps (git-ignored, `carry: [".devdeps"]`).
#   bench/device_convert.sh MODELS CACHES [PROFILE]   e.g. bench/device_convert.sh sa2va-4b drop,warm profile
set -uo pipefail
models=${1:-sa2va-4b}; caches=${2:-drop,warm}; profile=${3:-}
export PYTHONPATH=$PWD/src:$PWD/.devdeps PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nproc; free -g | head -2; df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 bench/bench_convert.py --models "$models" --merge-devices cpu,auto --runs c,b,a --check-equal \
  --cache "$caches" --work /tmp/sb --keep --json "$out/bench.json" --md "$out/bench.md" 2>&1 | tee "$out/log" | grep -v "^{"
if [ -n "$profile" ]; then  # one warm default run under py-spy, every thread, native frames
  m=${models%%,*}; d=/tmp/sb/$m
  cat "$d/base"/*.safetensors "$d/work_dirs/exp/iter_100.pth" > /dev/null
  timeout 150 .devdeps/bin/py-spy record --threads --native --idle -r 100 -f raw -o "$out/profile.txt" -- \
    python3 -m sa2va_convert "$d/work_dirs/exp/iter_100.pth" /tmp/sb/prof_out --base "$d/base" --no-verify \
    --force --json > "$out/profile_run.json" 2> "$out/profile_run.err"
  echo "py-spy rc $?"; tail -3 "$out/profile_run.err"
fi
