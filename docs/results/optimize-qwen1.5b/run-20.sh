#!/usr/bin/env bash
# Continuation of run.sh (after it finished): copies of both studies continued to 20 complete trials each (the 10
# new ones drawn by TPE, past the random start-up), at the same time, then --pick by the same rule and on the same
# test prompts as run.sh. Outputs in run-20/ and run-en-20/, compare-20.md.
set -euo pipefail
SRC=${OUT:-/tmp/optimize-qwen1.5b}
O=${OUT20:-/tmp/optimize-qwen1.5b-20}
HERE=$(cd "$(dirname "$0")" && pwd)
LANGS=en,de,es,fr,ru,zh,ja,ar
C=(--n-val 4 --max-new-tokens 32 --n-confirm 0 --kl-threshold 0.1 --threads "${THREADS:-2}")
export TQDM_DISABLE=1
[ -d "$O" ] || { mkdir -p "$O" && cp -r "$SRC/run" "$SRC/run-en" "$O/"; }
/usr/bin/time -v pyrefusal optimize "$O/run" --trials 20 --languages $LANGS --seed 1 "${C[@]}" \
  > "$O/run/optimize20.log" 2> "$O/run/optimize20.err" &
/usr/bin/time -v pyrefusal optimize "$O/run-en" --trials 20 --languages en --seed 2 "${C[@]}" \
  > "$O/run-en/optimize20.log" 2> "$O/run-en/optimize20.err" &
wait
best() {  # the trial with the least pooled refusal among KL <= 0.1 (else the least KL)
  python "$HERE/study_tools.py" best "$1" --max-kl 0.1
}
/usr/bin/time -v pyrefusal optimize "$O/run" --languages $LANGS --seed 1 "${C[@]}" --n-test 4 --no-test-harmless \
  --pick "$(best "$O/run/optimize/trials.jsonl")" > "$O/run/pick20.log" 2> "$O/run/pick20.err"
python "$HERE/study_tools.py" copy "$O/run/optimize/completions.jsonl" "$O/run-en/optimize/completions.jsonl" baseline paper
/usr/bin/time -v pyrefusal optimize "$O/run-en" --languages en --seed 2 "${C[@]}" --n-test 4 --no-test-harmless \
  --pick "$(best "$O/run-en/optimize/trials.jsonl")" > "$O/run-en/pick20.log" 2> "$O/run-en/pick20.err"
for d in run run-en; do
  mkdir -p "$HERE/$d-20"
  cp "$O/$d/optimize/"{report.md,pareto.md,pareto.png,trials.jsonl,reference.json,config.json,pick.json,pick_test.json} "$HERE/$d-20/"
  for f in optimize20 pick20; do grep -E "Elapsed|Maximum resident|Percent of CPU" "$O/$d/$f.err" > "$HERE/$d-20/time-$f.txt" || true; done
done
python "$HERE/summarize.py" "$HERE" run-20 run-en-20 compare-20.md > /dev/null
