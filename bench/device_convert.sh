#!/usr/bin/env bash
# The issue-14 device run (BENCHMARKS.md, "Device run"): the conversion bench on the H100 machine of the
# device tool, from the repository root, in one call (<= 10 min). mmengine-lite and its pure-Python deps
# travel in .devdeps (git-ignored, `carry: [".devdeps"]`).
#   8B: cache dropped with (c), (b), (a) x {cpu, auto} and the bit-for-bit check; then warm, (c) and (a)
#   4B: dropped and warm, (c) and (a) x {cpu, auto}; then (a) cpu warm with shards written one at a time
#   then: bench_merge_ops.py (the merge per block) and estimate_sparse.py (the 26B --dry-run estimate)
#   `bench/device_convert.sh short`: only 4B, warm then dropped, (c) and (a) x {cpu, auto}
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/.devdeps PYTHONUNBUFFERED=1  # (issue26-*: ../.devdeps, see below)
out=${OUT:-/tmp/out}; mkdir -p "$out"
bench() { python3 bench/bench_convert.py --work /tmp/sb "$@" 2>&1 | grep -v "^{"; }
if [ "${1:-}" = short ]; then  # what fits a few minutes: 4B warm then dropped, (c) and (a) x {cpu, auto}
  nproc; nvidia-smi --query-gpu=name --format=csv,noheader
  bench --models sa2va-4b --merge-devices cpu,auto --runs c,a --cache warm,drop \
    --json "$out/4b_short.json" --md "$out/4b_short.md" | tee "$out/log_4b_short"
  exit 0
fi
# issue 26, fourth session: two calls (<= 10 min each) from main's own checkout, carrying .devdeps (mmengine-lite),
# .whl (transformers 4.57.6, huggingface_hub 0.36.2, tokenizers 0.22.2: the device's own transformers 5 cannot
# load remote code that never calls post_init(), upstream's included) and .devwt/old (src/ and keymaps/ of
# 6bc4667, the previous final code, timed beside this one as "before"):
#   git archive 6bc4667 src keymaps | tar -x -C .devwt/old
#   bash bench/device_convert.sh s4-a   # 4B dropped (c, b, a x variants, bit-for-bit), round trip vs floor, 4B warm, 1B
#   bash bench/device_convert.sh s4-b   # 8B dropped (c, b, a x variants) and warm; the 26B estimate
if [ "${1:-}" = s4-a ] || [ "${1:-}" = s4-b ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD/src:/tmp/site:$PWD/.devdeps
  log="$out/log"
  { nproc; free -g | head -2; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    git log -1 --format=%h 2>/dev/null; } 2>&1 | tee -a "$log"
  old=(--also-src .devwt/old/src --also-label 6bc4667)
  if [ "${2:-}" = s5 ]; then  # fifth session, call 1: round trip vs floor (4B), 4B warm, 8B warm window A/B, 1B
    timeout 220 python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --skip-no-verify --early-child-ab \
      --json "$out/rt_4b.json" 2>&1 | tail -14 | tee -a "$log"
    timeout 100 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto,cpu --runs c,a \
      --cache warm --keep --json "$out/4b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    timeout 190 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --keep --also-env "window 384 MiB:SA2VA_WINDOW_MIB=384" \
      --also-env "window 256 MiB:SA2VA_WINDOW_MIB=256" --json "$out/8b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    timeout 75 python3 bench/bench_convert.py --work /tmp/sb1 --models sa2va-1b --merge-devices auto,cpu \
      --runs c,b,a --check-equal --cache drop,warm --json "$out/1b.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = s5-final ]; then  # fifth session, call 2: 8B dropped (c, b, a x2, bit for bit), 8B warm window A/B, 4B and 1B
    timeout 270 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto,cpu \
      --runs c,b,a --check-equal --cache drop --keep --json "$out/8b_drop.json" 2>&1 | grep -v "^{" | tee -a "$log"
    # the window fix (2aae378) against the code before it (3bd57fd, `git archive 3bd57fd src keymaps | tar -x -C
    # .devwt/s4`) and against a forced 384 MiB window: speed and peak RSS at 8B warm, GPU merge
    timeout 120 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --also-src .devwt/s4/src --also-label 3bd57fd --also-env "window 384 MiB:SA2VA_WINDOW_MIB=384" \
      --json "$out/8b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-8b
    timeout 110 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto --runs c,b,a \
      --check-equal --cache drop --json "$out/4b_drop.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    timeout 50 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-1b --merge-devices auto --runs c,b,a \
      --cache warm --json "$out/1b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = s6-4b ]; then  # what ~2 min allows: the pool cap's A/B at 4B, warm, GPU merge
    timeout 100 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto --runs c,a \
      --cache warm --also-env "pool 512 MiB (the old cap):SA2VA_POOL_MIB=512" \
      --json "$out/4b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  # seventh session: the final table with the final code, in two calls (~9 min each), plus what starting costs;
  # the first holds what no earlier call measured (the pool cap on a GPU, 1B warm, the import split)
  #   bash bench/device_convert.sh s4-a s7-a   # import costs; 8B warm pool A/B; 4B warm; 1B dropped and warm
  #   bash bench/device_convert.sh s4-a s7-b   # 8B and 4B dropped (c, b, a x {auto, cpu}, bit for bit); round trip
  if [ "${2:-}" = s7-a ]; then
    timeout 40 python3 bench/import_cost.py --cache warm --repeat 2 --steps python,cli,torch,tool,baseline \
      --json "$out/import_warm.json" 2>&1 | tee -a "$log"
    timeout 40 python3 bench/import_cost.py --cache drop --repeat 2 --steps torch,tool \
      --json "$out/import_drop.json" 2>&1 | tee -a "$log"
    timeout 170 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --also-env "pool 512 MiB (the old cap):SA2VA_POOL_MIB=512" \
      --json "$out/8b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-8b
    timeout 100 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto,cpu --runs c,a \
      --cache warm --json "$out/4b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    timeout 100 python3 bench/bench_convert.py --work /tmp/sb1 --models sa2va-1b --merge-devices auto --runs c,b,a \
      --cache drop,warm --json "$out/1b.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = s7-b ]; then
    timeout 270 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto,cpu \
      --runs c,b,a --check-equal --cache drop --json "$out/8b_drop.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-8b
    timeout 140 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto,cpu \
      --runs c,b,a --check-equal --cache drop --keep --json "$out/4b_drop.json" 2>&1 | grep -v "^{" | tee -a "$log"
    timeout 150 python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --skip-no-verify \
      --json "$out/rt_4b.json" 2>&1 | tail -12 | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = s6-min ]; then  # what ~5 min allows: the pool cap's A/B at 8B then 4B, warm, GPU merge
    timeout 170 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --also-env "pool 512 MiB (the old cap):SA2VA_POOL_MIB=512" \
      --json "$out/8b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-8b
    timeout 90 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto --runs c,a \
      --cache warm --also-env "pool 512 MiB (the old cap):SA2VA_POOL_MIB=512" \
      --json "$out/4b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = s6 ]; then  # sixth session: the pool cap (dd88f93) A/B at 8B and 4B warm, 4B dropped, 1B warm
    timeout 170 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --also-env "pool 512 MiB (the old cap):SA2VA_POOL_MIB=512" \
      --json "$out/8b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-8b
    timeout 150 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto --runs c,a \
      --cache drop,warm --also-env "pool 512 MiB (the old cap):SA2VA_POOL_MIB=512" \
      --json "$out/4b.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    timeout 60 python3 bench/bench_convert.py --work /tmp/sb1 --models sa2va-1b --merge-devices auto --runs c,b,a \
      --cache warm --json "$out/1b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = last ]; then  # what ~5 min of device time allows: round trip vs floor (4B), 8B warm window A/B
    timeout 150 python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --skip-no-verify --early-child-ab \
      --json "$out/rt_4b.json" 2>&1 | tail -12 | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    timeout 115 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --also-env "window 512 MiB:SA2VA_WINDOW_MIB=512" --json "$out/8b_warm.json" 2>&1 \
      | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "${2:-}" = second ]; then  # the second call: round trip vs floor, 4B prefetch A/B, 4B warm, 8B window A/B
    timeout 230 python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --skip-no-verify --early-child-ab \
      --json "$out/rt_4b.json" 2>&1 | tail -12 | tee -a "$log"
    timeout 120 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto --runs c,a \
      --cache drop --keep --also-env "prefetch every input:SA2VA_PREFETCH=64" \
      --also-env "no prefetch:SA2VA_PREFETCH=0" --json "$out/4b_drop.json" 2>&1 | grep -v "^{" | tee -a "$log"
    timeout 80 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-4b --merge-devices auto --runs c,a \
      --cache warm --keep "${old[@]}" --json "$out/4b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    timeout 150 python3 bench/bench_convert.py --work /tmp/sb --models sa2va-8b --merge-devices auto --runs c,a \
      --cache warm --also-env "window 512 MiB:SA2VA_WINDOW_MIB=512" --also-env "window 384 MiB:SA2VA_WINDOW_MIB=384" \
      --json "$out/8b_warm.json" 2>&1 | grep -v "^{" | tee -a "$log"
    exit 0
  fi
  if [ "$1" = s4-a ]; then
    sync; echo 3 > /proc/sys/vm/drop_caches
    /usr/bin/time -f "import torch, cache dropped: %e s" python3 -c "import torch" 2>&1 | tee -a "$log"
    /usr/bin/time -f "import torch, warm: %e s" python3 -c "import torch" 2>&1 | tee -a "$log"
    bench --models sa2va-4b --merge-devices auto,cpu --runs c,b,a --check-equal --cache drop --keep "${old[@]}" \
      --also-env "prefetch capped at 2 GiB:SA2VA_PREFETCH=2" --also-env "no prefetch:SA2VA_PREFETCH=0" \
      --json "$out/4b_drop.json" 2>&1 | tee -a "$log"
    python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --skip-no-verify --early-child-ab \
      --json "$out/rt_4b.json" 2>&1 | tail -12 | tee -a "$log"
    bench --models sa2va-4b --merge-devices auto,cpu --runs c,a --cache warm "${old[@]}" \
      --json "$out/4b_warm.json" 2>&1 | tee -a "$log"
    rm -rf /tmp/sb/sa2va-4b
    bench --models sa2va-1b --merge-devices auto,cpu --runs c,b,a --check-equal --cache drop,warm \
      --json "$out/1b.json" 2>&1 | tee -a "$log"
  else
    bench --models sa2va-8b --merge-devices auto,cpu --runs c,b,a --cache drop --keep "${old[@]}" \
      --also-env "window 512 MiB:SA2VA_WINDOW_MIB=512" --json "$out/8b_drop.json" 2>&1 | tee -a "$log"
    bench --models sa2va-8b --merge-devices auto,cpu --runs c,a --cache warm "${old[@]}" \
      --also-env "window 512 MiB:SA2VA_WINDOW_MIB=512" --json "$out/8b_warm.json" 2>&1 | tee -a "$log"
    rm -rf /tmp/sb/sa2va-8b
    python3 bench/estimate_sparse.py --models sa2va-8b,sa2va-26b --work /tmp/sparse > "$out/estimate_26b.log" 2>&1
    grep "^sa2va" "$out/estimate_26b.log" | tee -a "$log"
  fi
  exit 0
fi
# issue 26: this branch packed into .devwt/ of main's checkout (the device copies main's tree), run from
# there, with main's own src/ (../src) timed beside it as "before". Two calls of <= 10 min each:
#   cd .devwt && bash bench/device_convert.sh issue26-8b   # 8B dropped (c, b, a x3, bit-for-bit) and warm
#   cd .devwt && bash bench/device_convert.sh issue26-4b   # 4B dropped and warm, the round-trip floor, 1B
# The final run of issue 26 in one call (~8 min; the figures of BENCHMARKS.md's issue-26 table), in
# order of importance so that a cut-off run still returns the first parts (everything is tee'd to $OUT):
#   cd .devwt && bash bench/device_convert.sh issue26-final
if [ "${1:-}" = issue26-final ]; then
  export PYTHONPATH=$PWD/src:$PWD/../.devdeps
  log="$out/log"
  { nproc; free -g | head -2; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; } 2>&1 | tee -a "$log"
  # 8B dropped then warm, (c) and (a) x {cpu, auto}; (b) at 8B and its element check are in run 1
  bench --models sa2va-8b --merge-devices cpu,auto --runs c,a --cache drop,warm \
    --json "$out/8b.json" 2>&1 | tee -a "$log"
  # 4B dropped, (c), (b) and (a) x {cpu, auto}, each (a) compared with (b) element by element
  bench --models sa2va-4b --merge-devices cpu,auto --runs c,b,a --check-equal --cache drop --keep \
    --json "$out/4b_drop.json" 2>&1 | tee -a "$log"
  python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --skip-no-verify --json "$out/rt_4b.json" \
    2>&1 | tail -8 | tee -a "$log"
  bench --models sa2va-4b --merge-devices cpu,auto --runs c,a --cache warm \
    --json "$out/4b_warm.json" 2>&1 | tee -a "$log"
  bench --models sa2va-1b --merge-devices cpu --runs c,b,a --check-equal --cache drop \
    --json "$out/1b.json" 2>&1 | tee -a "$log"
  exit 0
fi
if [ "${1:-}" = issue26-8b ]; then
  export PYTHONPATH=$PWD/src:$PWD/../.devdeps
  nproc; free -g | head -2; df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  bench --models sa2va-8b --merge-devices cpu,auto --runs c,b,a --check-equal --cache drop --keep \
    --also-src ../src --also-label main \
    --json "$out/8b_drop.json" --md "$out/8b_drop.md" | tee "$out/log_8b_drop"
  bench --models sa2va-8b --merge-devices cpu,auto --runs c,a --cache warm \
    --json "$out/8b_warm.json" --md "$out/8b_warm.md" | tee "$out/log_8b_warm"
  exit 0
fi
if [ "${1:-}" = issue26-4b ]; then
  export PYTHONPATH=$PWD/src:$PWD/../.devdeps
  bench --models sa2va-4b --merge-devices cpu,auto --runs c,b,a --check-equal --cache drop,warm --keep \
    --also-src ../src --also-label main \
    --json "$out/4b.json" --md "$out/4b.md" | tee "$out/log_4b"
  python3 bench/roundtrip_floor.py --model sa2va-4b --work /tmp/sb --json "$out/rt_4b.json" 2>&1 | tail -8 \
    | tee "$out/log_rt"
  rm -rf /tmp/sb/sa2va-4b
  bench --models sa2va-1b --merge-devices cpu,auto --runs c,b,a --check-equal --cache drop \
    --json "$out/1b.json" --md "$out/1b.md" | tee "$out/log_1b"
  exit 0
fi
nproc; free -g | head -2; df -h /tmp | tail -1; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
sync; echo 3 > /proc/sys/vm/drop_caches
/usr/bin/time -f "import torch, cache dropped: %e s" python3 -c "import torch"
/usr/bin/time -f "import torch, warm: %e s" python3 -c "import torch"
/usr/bin/time -f "import torch + sa2va_convert.conversion, warm: %e s" python3 -c "import sa2va_convert.conversion"
bench --models sa2va-8b --merge-devices cpu,auto --runs c,b,a --check-equal --cache drop --keep \
  --json "$out/8b_drop.json" --md "$out/8b_drop.md" | tee "$out/log_8b_drop"
bench --models sa2va-8b --merge-devices cpu,auto --runs c,a --cache warm \
  --json "$out/8b_warm.json" --md "$out/8b_warm.md" | tee "$out/log_8b_warm"
rm -rf /tmp/sb/sa2va-8b
bench --models sa2va-4b --merge-devices cpu,auto --runs c,a --cache drop,warm --keep \
  --json "$out/4b.json" --md "$out/4b.md" | tee "$out/log_4b"
SA2VA_PARALLEL_SHARDS=1 bench --models sa2va-4b --merge-devices cpu --runs a --cache warm \
  --json "$out/4b_one_shard_at_a_time.json" --md "$out/4b_one_shard_at_a_time.md" | tee "$out/log_4b_one"
SA2VA_PREFETCH=0 bench --models sa2va-4b --merge-devices cpu --runs a --cache drop \
  --json "$out/4b_no_prefetch.json" --md "$out/4b_no_prefetch.md" | tee "$out/log_4b_noprefetch"
# the merge's ops per block on this machine's cores (one torch thread), and the 26B estimate with this
# machine's own counts and CUDA-torch baseline (a sparse base: no disk), both seconds
python3 bench/bench_merge_ops.py --json > "$out/merge_ops.json"; python3 bench/bench_merge_ops.py
python3 bench/estimate_sparse.py --models sa2va-8b,sa2va-26b --work /tmp/sparse > "$out/estimate_26b.log" 2>&1
grep "^sa2va" "$out/estimate_26b.log"
