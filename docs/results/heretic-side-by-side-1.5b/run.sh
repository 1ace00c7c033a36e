#!/bin/bash
# heretic vs `pyrefusal optimize`, English only, Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), CPU, 2 threads, nice 10.
# What was run on 2026-12-07, 10:28-12:00 UTC (see README.md); the session ran these steps by hand in this order.
# Adapted from ../heretic-side-by-side/run.sh (the 0.5B comparison); heretic's venv (/tmp/heretic-venv,
# heretic-llm 1.4.0, torch 2.13.0+cpu, transformers 5.24.0) was reused as installed there (step 1 of that script).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
S=$HERE/../heretic-side-by-side   # the 0.5B comparison's scripts, used unchanged
OUT=/tmp/hs15
GGUF=~/.cache/pyrefusal/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
mkdir -p "$OUT/heretic-work"

# 1. The same model as a transformers checkpoint (dequantized Q4_K_M -> float32, 7.1 GB; the GGUF carries its own
#    Q6_K output.weight, so the checkpoint has an untied lm_head like the GGUF).
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 nice -n 10 /tmp/heretic-venv/bin/python "$S/dequantize.py" "$GGUF" "$OUT/qwen1.5b-hf" \
  > "$OUT/dequantize.log" 2>&1

# 2. Two copies of the existing 1.5B run (/tmp/optimize-qwen1.5b/run: en source, 32 train / 8 val, seed 1), without
#    its optimize/ study (optimize resumes a study it finds).
for d in run-front run-timing; do cp -r /tmp/optimize-qwen1.5b/run "$OUT/$d"; rm -rf "$OUT/$d/optimize"; done

# 3. The same English prompts as heretic dataset files: direction prompts = the run's refusal-filtered train prompts
#    (30 harmful, 31 harmless); evaluation prompts = the 8 + 8 en val prompts `optimize --n-val 8` scores.
python "$S/export_prompts.py" "$OUT/run-front" 8 "$OUT/prompts"
cp "$HERE/config.toml" "$OUT/heretic-work/config.toml"

# 4. pyrefusal optimize, 6 trials, every Pareto trial confirmed by generation (for the shared detector); monitored.
#    (Ran 10:29-10:4x UTC, concurrently with step 1 and heretic's model load / baseline.)
OMP_NUM_THREADS=2 nice -n 10 pyrefusal optimize "$OUT/run-front" --languages en --trials 6 --n-val 8 --threads 2 \
  --n-confirm 6 --kl-threshold 100 --max-new-tokens 24 --seed 1 > "$OUT/pyrefusal-front.log" 2>&1 &
P=$!
python "$S/monitor.py" "$P" "$OUT/pyrefusal-front.log" 'trial \d+ \(\d+/\d+\)' "$OUT/monitor-pyrefusal-front.jsonl" &

# 5. heretic through the logging wrapper (6 trials configured; stopped at the deadline), CPU time sampled once a second.
cd "$OUT/heretic-work"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
  nice -n 10 /tmp/heretic-venv/bin/python "$S/heretic_wrapper.py" "$OUT/heretic.json" < /dev/null \
  > "$OUT/heretic.log" 2>&1 &
HPID=$!
cd - > /dev/null
python "$S/monitor.py" "$HPID" "$OUT/heretic.log" "Running trial \d+ of|answering 'Exit program'" \
  "$OUT/monitor-heretic.jsonl" &

# 5b. (10:50:50 UTC) The kernel groups processes by session (sched_autogroup_enabled = 1), so per-process nice only
#     ranks processes inside one session: the session's processes were lowered as a group too, so that the other
#     long measurement (its own session) keeps priority as intended:
echo 10 > "/proc/$HPID/autogroup"   # applies to the whole autogroup of this session (only this session's processes)

# 6. Once heretic is in its trial loop: pyrefusal timing studies (no confirmation) on fresh copies, monitored, so that
#    pyrefusal trials run in the same window as heretic trials. timing1: started 10:46 (heretic trial 1), stopped
#    after 4 trials (3 whole intervals) by kill_after.sh; timing2: started 11:11 (its trials fell in heretic trial 3).
timing() {  # timing RUN_DIR TRIALS
  OMP_NUM_THREADS=2 nice -n 10 pyrefusal optimize "$1" --languages en --trials "$2" --n-val 8 --threads 2 \
    --n-confirm 0 --max-new-tokens 24 --seed 1 > "$OUT/pyrefusal-$(basename "$1").log" 2>&1 &
  local P=$!
  python "$S/monitor.py" "$P" "$OUT/pyrefusal-$(basename "$1").log" 'trial \d+ \(\d+/\d+\)' \
    "$OUT/monitor-pyrefusal-$(basename "$1").jsonl" > /dev/null &
  echo "$P"
}
until grep -aq "Running trial 1 of" "$OUT/heretic.log"; do sleep 3; done
P=$(timing "$OUT/run-timing" 6); "$HERE/kill_after.sh" "$P" "$OUT/monitor-pyrefusal-run-timing.jsonl" 4
cp -r /tmp/optimize-qwen1.5b/run "$OUT/run-timing2"; rm -rf "$OUT/run-timing2/optimize"
P=$(timing "$OUT/run-timing2" 4)
# heretic stopped (SIGTERM) when its 4th trial began, so that trial 3's interval closes (deadline).
"$HERE/kill_after.sh" "$HPID" "$OUT/monitor-heretic.jsonl" 4
wait

# 7. One detector on both sides' completions; CPU seconds per trial from the monitors.
python "$S/score.py" "$OUT/heretic.json" "$OUT/run-front" "$HERE/side_by_side.json"
python "$S/cpu_per_trial.py" "$HERE/cpu_per_trial.json" heretic="$OUT/monitor-heretic.jsonl" \
  pyrefusal_front="$OUT/monitor-pyrefusal-front.jsonl" pyrefusal_timing1="$OUT/monitor-pyrefusal-run-timing.jsonl" \
  pyrefusal_timing2="$OUT/monitor-pyrefusal-run-timing2.jsonl"

# ---------------------------------------------------------------------------------------------------------------
# 8. Quiet machine, equal trial counts (2026-12-07, 12:06-12:2x UTC; README "Quiet machine, equal trial counts").
#    Nothing else running (load1 0.01 before), no nice, 2 threads, one side after the other, 6 trials each.
#    Reuses $S's scripts, the float32 checkpoint and prompts in /tmp/hs15 (read only) and heretic's venv.
Q=/tmp/hs15q
QD=$HERE/quiet
mkdir -p "$Q/heretic-work" "$QD/pyrefusal"
cp -r /tmp/optimize-qwen1.5b/run "$Q/run-quiet"; rm -rf "$Q/run-quiet/optimize"
# 8a. pyrefusal (6 trials, every first-token-Pareto trial confirmed by generation), monitored.
{ uptime; date -u +%T; } > "$Q/load-before-pyrefusal.txt"
OMP_NUM_THREADS=2 pyrefusal optimize "$Q/run-quiet" --languages en --trials 6 --n-val 8 --threads 2 \
  --n-confirm 6 --kl-threshold 100 --max-new-tokens 24 --seed 1 > "$Q/pyrefusal-quiet.log" 2>&1 &
P=$!
python "$S/monitor.py" "$P" "$Q/pyrefusal-quiet.log" 'trial \d+ \(\d+/\d+\)' "$Q/monitor-pyrefusal-quiet.jsonl" &
wait
{ uptime; date -u +%T; } > "$Q/load-after-pyrefusal.txt"
# 8b. heretic, after pyrefusal finished: the same config but n_trials = 6 and a new study checkpoint dir (no resume).
sed -e "s|^study_checkpoint_dir = .*|study_checkpoint_dir = \"$Q/heretic-work/checkpoints\"|" \
  -e 's|^n_trials = 6 .*|n_trials = 6                  # equal to pyrefusal --trials 6 (quiet-machine run)|' \
  "$OUT/heretic-work/config.toml" > "$Q/heretic-work/config.toml"
{ uptime; date -u +%T; } > "$Q/load-before-heretic.txt"
cd "$Q/heretic-work"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 \
  /tmp/heretic-venv/bin/python "$S/heretic_wrapper.py" "$Q/heretic.json" < /dev/null > "$Q/heretic.log" 2>&1 &
HPID=$!
cd - > /dev/null
python "$S/monitor.py" "$HPID" "$Q/heretic.log" "Running trial \d+ of|answering 'Exit program'" \
  "$Q/monitor-heretic.jsonl" &
wait
{ uptime; date -u +%T; } > "$Q/load-after-heretic.txt"
# 8c. One detector on both sides' completions; CPU and wall seconds per trial from the monitors.
python "$S/score.py" "$Q/heretic.json" "$Q/run-quiet" "$Q/side_by_side.json"
python "$S/cpu_per_trial.py" "$Q/cpu_per_trial.json" heretic="$Q/monitor-heretic.jsonl" \
  pyrefusal="$Q/monitor-pyrefusal-quiet.jsonl"
# 8d. Small outputs into the repository.
cp "$Q/side_by_side.json" "$Q/cpu_per_trial.json" "$Q/heretic.json" "$Q"/load-*.txt \
  "$Q/monitor-heretic.jsonl" "$Q/monitor-pyrefusal-quiet.jsonl" "$QD/"
grep -av "offline mode" "$Q/heretic.log" > "$QD/heretic.log"
(cd "$Q/run-quiet/optimize" && cp trials.jsonl completions.jsonl report.md pareto.md pareto.png config.json \
  reference.json "$QD/pyrefusal/")
cp "$Q/heretic-work/config.toml" "$QD/heretic-config.toml"
cp "$Q/pyrefusal-quiet.log" "$QD/pyrefusal/optimize-quiet.log"
