#!/usr/bin/env bash
# After run-20.sh: the same two picks (no new trials) on the run's whole test split, 12 prompts per kind and
# language, harmful and harmless generations (false refusals). Outputs in run-20-n12/, run-en-20-n12/, compare-20-n12.md.
set -euo pipefail
O=${OUT20:-/tmp/optimize-qwen1.5b-20}
HERE=$(cd "$(dirname "$0")" && pwd)
C=(--n-val 4 --max-new-tokens 32 --n-confirm 0 --kl-threshold 0.1 --threads "${THREADS:-2}" --n-test 12 --test-harmless)
export TQDM_DISABLE=1
pick_of() { python -c 'import json,sys; print(json.load(open(sys.argv[1]))["trial"])' "$1/optimize/pick.json"; }
/usr/bin/time -v pyrefusal optimize "$O/run" --languages en,de,es,fr,ru,zh,ja,ar --seed 1 "${C[@]}" \
  --pick "$(pick_of "$O/run")" > "$O/run/pick12.log" 2> "$O/run/pick12.err"
python "$HERE/study_tools.py" copy "$O/run/optimize/completions.jsonl" "$O/run-en/optimize/completions.jsonl" baseline paper
/usr/bin/time -v pyrefusal optimize "$O/run-en" --languages en --seed 2 "${C[@]}" \
  --pick "$(pick_of "$O/run-en")" > "$O/run-en/pick12.log" 2> "$O/run-en/pick12.err"
for d in run run-en; do
  mkdir -p "$HERE/$d-20-n12"
  cp "$O/$d/optimize/"{report.md,trials.jsonl,pick.json,pick_test.json} "$HERE/$d-20-n12/"
  grep -E "Elapsed|Maximum resident|Percent of CPU" "$O/$d/pick12.err" > "$HERE/$d-20-n12/time-pick12.txt" || true
done
python "$HERE/summarize.py" "$HERE" run-20-n12 run-en-20-n12 compare-20-n12.md > /dev/null
