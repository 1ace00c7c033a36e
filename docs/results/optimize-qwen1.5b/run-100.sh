#!/usr/bin/env bash
# After run-20-n12.sh: copies of both studies continued to 100 complete trials each (TPE), one after the other on
# the same 2 cores (multilingual first, then English-only), then each study picked by two rules and reported on the
# run's whole test split (12 prompts per kind and language, harmful and harmless generations):
#   kl10   the rule of run.sh: least pooled val refusal among trials with val KL <= 0.10;
#   half   the issue's goal stated on val: least pooled val refusal among trials whose val KL is at most half the
#          paper's pick's pooled val KL (reference.json), i.e. the budget the goal allows.
# Outputs in run-100-<rule>/, run-en-100-<rule>/, compare-100-<rule>.md.
set -euo pipefail
SRC=${OUT20:-/tmp/optimize-qwen1.5b-20}
O=${OUT100:-/tmp/optimize-qwen1.5b-100}
HERE=$(cd "$(dirname "$0")" && pwd)
LANGS=en,de,es,fr,ru,zh,ja,ar
C=(--n-val 4 --max-new-tokens 32 --n-confirm 0 --kl-threshold 0.1 --threads "${THREADS:-2}")
export TQDM_DISABLE=1
[ -d "$O/run" ] || { mkdir -p "$O" && cp -r "$SRC/run" "$SRC/run-en" "$O/"; }
date -u
/usr/bin/time -v pyrefusal optimize "$O/run" --trials 100 --languages $LANGS --seed 1 "${C[@]}" \
  > "$O/run/optimize100.log" 2> "$O/run/optimize100.err"
date -u
/usr/bin/time -v pyrefusal optimize "$O/run-en" --trials 100 --languages en --seed 2 "${C[@]}" \
  > "$O/run-en/optimize100.log" 2> "$O/run-en/optimize100.err"
date -u
best() {  # trials.jsonl, reference.json, rule
  if [ "$3" = kl10 ]; then python "$HERE/study_tools.py" best "$1" --max-kl 0.1
  else python "$HERE/study_tools.py" best "$1" --half "$2"; fi
}
for rule in kl10 half; do
  for d in run run-en; do
    langs=$LANGS; seed=1; [ "$d" = run-en ] && { langs=en; seed=2; }
    n=$(best "$O/$d/optimize/trials.jsonl" "$O/$d/optimize/reference.json" $rule)
    /usr/bin/time -v pyrefusal optimize "$O/$d" --languages $langs --seed $seed "${C[@]}" --n-test 12 --test-harmless \
      --pick "$n" > "$O/$d/pick100-$rule.log" 2> "$O/$d/pick100-$rule.err"
    mkdir -p "$HERE/$d-100-$rule"
    cp "$O/$d/optimize/"{report.md,pareto.md,pareto.png,trials.jsonl,reference.json,pick.json,pick_test.json} "$HERE/$d-100-$rule/"
    grep -E "Elapsed|Maximum resident|Percent of CPU" "$O/$d/pick100-$rule.err" > "$HERE/$d-100-$rule/time-pick.txt" || true
    if [ "$d" = run ]; then  # the baseline and the paper's pick on the same test prompts: generated once, shared
      python "$HERE/study_tools.py" copy "$O/run/optimize/completions.jsonl" "$O/run-en/optimize/completions.jsonl" \
        baseline paper
    fi
  done
  python "$HERE/summarize.py" "$HERE" run-100-$rule run-en-100-$rule compare-100-$rule.md > /dev/null
done
for d in run run-en; do
  grep -E "Elapsed|Maximum resident|Percent of CPU" "$O/$d/optimize100.err" > "$HERE/$d-100-kl10/time-optimize100.txt" || true
done
date -u
