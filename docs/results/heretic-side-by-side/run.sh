#!/bin/bash
# heretic vs `pyrefusal optimize`, English only, Qwen2.5-Coder-0.5B-Instruct, CPU, 2 threads.
# What was run on 2026-12-07 (see README.md). Paths under /tmp; HERE = this directory.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/hs}
GGUF=~/.cache/pyrefusal/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
mkdir -p "$OUT/heretic-work"

# 1. heretic in its own environment (torch: the CPU wheel on this machine's disk; PyPI's default torch pulls CUDA).
python -m venv /tmp/heretic-venv
/tmp/heretic-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
/tmp/heretic-venv/bin/pip install heretic-llm gguf "torch==2.13.0+cpu" 2>&1 | tee "$OUT/heretic-install.log"

# 2. The same model as a transformers checkpoint (dequantized Q4_K_M -> float32).
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 nice -n 5 /tmp/heretic-venv/bin/python "$HERE/dequantize.py" "$GGUF" "$OUT/qwen0.5b-hf"

# 3. A pyrefusal run directory of the same model. The one used was a copy of docs/results/optimize-qwen0.5b's
#    run (/tmp/optimize-qwen0.5b/run: en source, 32 train / 8 val, seed 1); a fresh one is made by
#    pyrefusal run --out /tmp/hrun --target-langs en --n-test 8 --no-capability --max-new-tokens 24 --threads 2
#    (same train prompts and candidates: the direction stage does not depend on the test languages).
RUN=${RUN:-/tmp/hrun2}
RUN_TIMING=${RUN_TIMING:-/tmp/hrun3}   # a second copy, for the CPU-time measurement

# 4. The same English prompts as heretic dataset files (one prompt per line).
python "$HERE/export_prompts.py" "$RUN" 8 "$OUT/prompts"      # train prompts (direction) from RUN/prompts.json
python "$HERE/export_prompts.py" "$RUN" 12 "$OUT/prompts12"   # the 12+12 en val prompts optimize --n-val 12 scores
cp "$HERE/config.toml" "$OUT/heretic-work/config.toml"

# 5. pyrefusal optimize, 8 trials, every Pareto trial confirmed by generation (for the shared detector).
nice -n 5 pyrefusal optimize "$RUN" --languages en --trials 8 --n-val 12 --threads 2 \
  --n-confirm 8 --kl-threshold 100 --max-new-tokens 24 2>&1 | tee "$OUT/pyrefusal.log"

# 6. heretic, 8 trials, through the logging wrapper; its CPU time sampled once a second.
cd "$OUT/heretic-work"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2 \
  nice -n 5 /tmp/heretic-venv/bin/python "$HERE/heretic_wrapper.py" "$OUT/heretic.json" < /dev/null \
  > "$OUT/heretic.log" 2>&1 &
HPID=$!
cd - > /dev/null
python "$HERE/monitor.py" "$HPID" "$OUT/heretic.log" "Running trial \d+ of|answering 'Exit program'" \
  "$OUT/monitor-heretic.jsonl" &

# 7. While heretic runs its trials: pyrefusal studies of 4 trials without confirmation on fresh copies of the run
#    (the session ran two, at 08:17 and 08:41 UTC, i.e. under two different loads), monitored the same way.
#    (A third pair was made afterwards: heretic again with n_trials = 3 in its own directory, heretic-work2, and a
#    third pyrefusal timing study started when heretic entered its trial loop.)
for R in "$RUN_TIMING" "${RUN_TIMING}b"; do
  nice -n 5 pyrefusal optimize "$R" --languages en --trials 4 --n-val 12 --threads 2 --n-confirm 0 \
    --max-new-tokens 24 > "$OUT/$(basename "$R").log" 2>&1 &
  P=$!
  python "$HERE/monitor.py" "$P" "$OUT/$(basename "$R").log" "trial \d+ \(\d+/\d+\)" "$OUT/monitor-$(basename "$R").jsonl"
done
wait

# 8. One detector on both sides' completions; CPU seconds per trial from the monitors.
python "$HERE/score.py" "$OUT/heretic.json" "$RUN" "$HERE/side_by_side.json"
python "$HERE/cpu_per_trial.py" "$HERE/cpu_per_trial.json" heretic_study1="$OUT/monitor-heretic.jsonl" \
  pyrefusal_timing1="$OUT/monitor-$(basename "$RUN_TIMING").jsonl" \
  pyrefusal_timing2="$OUT/monitor-$(basename "$RUN_TIMING")b.jsonl"   # + heretic_study2, pyrefusal_timing3
