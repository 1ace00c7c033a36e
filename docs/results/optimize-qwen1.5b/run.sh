#!/usr/bin/env bash
# The measurement behind docs/results/optimize-qwen1.5b/ (issue 13 "Measure" 1 and 3), on 2 CPU cores shared with
# other jobs: Qwen2.5-Coder-1.5B-Instruct Q4_K_M, 8 languages.
# 1. `pyrefusal run` (source en; 32 tokens; its own test split of 12 prompts per kind and language, baseline only),
# 2. the multilingual optimize study (objective: all 8 languages, 4+4 val prompts each) with seed 1, and at the
#    same time 3. the English-only study (--languages en, heretic's setting) on a copy of the run, seed 2 (so that
#    its random start-up trials differ), the same --trials and val size; each session is stopped (SIGTERM) once it
#    holds $STOP complete trials (all that fitted on the shared cores; the study resumes with --trials N),
# 4. --pick for both by the same rule (the trial with the least pooled val refusal among KL <= 0.10, else the least
#    KL), each reported on the same test split ($N_TEST prompts per kind and language, all 8 languages; generation
#    on the harmful ones only, --no-test-harmless) next to the paper's pick and the baseline. The multilingual
#    study's --pick generates the baseline and the paper's pick; they are copied into the English-only study's
#    completions.jsonl before its --pick (same prompts, order, batches and budget: the same greedy generations).
#    Pick and paper completions stop once the detector reads a refusal (finish_reason refusal_detected).
# No confirmation generations on val (--n-confirm 0): they did not fit.
# Re-running resumes every stage (pyrefusal run and optimize are resumable; --trials N continues a study).
set -euo pipefail
OUT=${OUT:-/tmp/optimize-qwen1.5b}
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=qwen2.5-coder-1.5b-instruct-q4_k_m
DATA=${DATA:-/work/shared/polyrefuse}
LANGS=en,de,es,fr,ru,zh,ja,ar
THREADS=${THREADS:-2}
TRIALS=${TRIALS:-60}  # the studies' --trials (TPE's random start-up: min(10, TRIALS // 3) trials)
STOP=${STOP:-10}      # ... but each session is stopped once it holds STOP complete trials (what fitted; README)
N_TEST=${N_TEST:-4}   # test prompts per kind and language for both picks (generation: harmful prompts only)
COMMON=(--n-val 4 --max-new-tokens 32 --n-confirm 0 --kl-threshold 0.1 --threads "$THREADS")
export TQDM_DISABLE=1
mkdir -p "$OUT"
[ -f "$OUT/run/results.json" ] || /usr/bin/time -v pyrefusal run --model $MODEL --data-dir "$DATA" --out "$OUT/run" --source-lang en \
  --target-langs $LANGS --n-test 12 --max-new-tokens 32 --no-capability --threads "$THREADS" --conditions baseline \
  > "$OUT/run.log" 2> "$OUT/run.err" || { tail -20 "$OUT/run.err"; exit 1; }
best() {  # the trial with the least pooled refusal among KL <= 0.1 (else the least KL)
  python "$HERE/study_tools.py" best "$1" --max-kl 0.1
}
complete() {  # complete trials in a study's trials.jsonl
  python -c 'import json,sys; print(sum(json.loads(l)["state"] == "COMPLETE" for l in open(sys.argv[1]) if l.strip()))' \
    "$1" 2>/dev/null || echo 0
}
search() {  # run dir, languages, seed: a study of --trials $TRIALS, stopped (SIGTERM) at $STOP complete trials
  local dir=$1 langs=$2 seed=$3 pid
  [ "$(complete "$dir/optimize/trials.jsonl")" -ge "$STOP" ] && return 0
  /usr/bin/time -v pyrefusal optimize "$dir" --trials "$TRIALS" --languages "$langs" --seed "$seed" "${COMMON[@]}" \
    > "$dir/optimize.log" 2> "$dir/optimize.err" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(complete "$dir/optimize/trials.jsonl")" -ge "$STOP" ]; then pkill -TERM -P "$pid"; fi
    sleep 5
  done
}
pick() {  # run dir, languages, seed
  local dir=$1 langs=$2 seed=$3 n
  n=$(best "$dir/optimize/trials.jsonl")
  /usr/bin/time -v pyrefusal optimize "$dir" --languages "$langs" --seed "$seed" "${COMMON[@]}" --n-test "$N_TEST" --no-test-harmless \
    --pick "$n" \
    > "$dir/pick.log" 2> "$dir/pick.err" || { tail -20 "$dir/pick.err"; exit 1; }
}
if [ ! -d "$OUT/run-en" ]; then  # the English-only study's copy of the finished run (before any optimize files)
  mkdir -p "$OUT/run-en"
  (cd "$OUT/run" && cp -r $(ls | grep -v '^optimize$' | grep -v '\.log$\|\.err$') "$OUT/run-en/")
fi
copy() {  # completions of a condition from one completions.jsonl to another (those not there yet)
  python "$HERE/study_tools.py" copy "$1" "$2" "$3"
}
copy "$OUT/run/completions.jsonl" "$OUT/run/optimize/completions.jsonl" baseline  # used when N_TEST = the run's 12
copy "$OUT/run/completions.jsonl" "$OUT/run-en/optimize/completions.jsonl" baseline
search "$OUT/run" $LANGS 1 &  # both searches at once (their processes share the 2 cores with other jobs)
search "$OUT/run-en" en 2 &
wait
pick "$OUT/run" $LANGS 1
copy "$OUT/run/optimize/completions.jsonl" "$OUT/run-en/optimize/completions.jsonl" paper
copy "$OUT/run/optimize/completions.jsonl" "$OUT/run-en/optimize/completions.jsonl" baseline
pick "$OUT/run-en" en 2
for d in run run-en; do
  mkdir -p "$HERE/$d"
  cp "$OUT/$d/optimize/"{report.md,pareto.md,pareto.png,trials.jsonl,reference.json,config.json,pick.json,pick_test.json} "$HERE/$d/"
  for f in optimize pick; do grep -E "Elapsed|Maximum resident" "$OUT/$d/$f.err" > "$HERE/$d/time-$f.txt" || true; done
  grep -v '^{\|^ \|^}' "$OUT/$d/optimize.err" | grep -v "Command being timed" > "$HERE/$d/optimize.log" || true
done
cp "$OUT/run/report.md" "$HERE/run-report.md"
grep -E "Elapsed|Maximum resident" "$OUT/run.err" > "$HERE/time-run.txt" || true
python "$HERE/summarize.py" "$HERE" > /dev/null
