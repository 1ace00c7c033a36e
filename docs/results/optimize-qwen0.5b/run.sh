#!/usr/bin/env bash
# The measurement behind docs/results/optimize-qwen0.5b/ (2 shared CPU cores, minutes, not hours).
# 1. a quick `pyrefusal run` of the default model (4 languages), 2. a 4-language optimize study,
# 3. --pick: the Pareto trial with the least pooled refusal at KL <= 0.1, reported on the test split,
# 4. the same study with --languages en (heretic's English-only setting) on a copy of the run, same pick rule.
set -euo pipefail
OUT=${OUT:-/tmp/optimize-qwen0.5b}
HERE=$(cd "$(dirname "$0")" && pwd)
LANGS=en,de,zh,ja
THREADS=${THREADS:-2}
TRIALS=${TRIALS:-16}
mkdir -p "$OUT"
pyrefusal run --out "$OUT/run" --target-langs $LANGS --n-test 12 --no-capability --threads $THREADS 2>&1 | tail -5
best() {  # the Pareto trial with the least pooled refusal among KL <= 0.1 (else the least KL)
  python - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r["state"] == "COMPLETE"]
ok = [r for r in rows if r["kl"] <= 0.1]
print(min(ok, key=lambda r: r["refusal"])["number"] if ok else min(rows, key=lambda r: r["kl"])["number"])
PY
}
opt() {  # run dir, languages, extra args (the same for the search and the pick)
  local dir=$1 langs=$2; shift 2
  /usr/bin/time -v pyrefusal optimize "$dir" --trials $TRIALS --languages "$langs" --n-val 6 \
    --max-new-tokens 32 --threads $THREADS "$@" > "$dir/optimize.log" 2> "$dir/optimize.err" || { tail -20 "$dir/optimize.err"; exit 1; }
  local n; n=$(best "$dir/optimize/trials.jsonl")
  pyrefusal optimize "$dir" --languages "$langs" --n-val 6 --max-new-tokens 32 --threads $THREADS "$@" \
    --pick "$n" > "$dir/pick.log" 2> "$dir/pick.err" || { tail -20 "$dir/pick.err"; exit 1; }
}
opt "$OUT/run" $LANGS --n-confirm 3   # test split: the run's 12 prompts per kind and language
if [ "${ENGLISH_ONLY:-1}" = 1 ]; then  # on a copy of the run; a smaller test split (3 per kind and language), for time
  rm -rf "$OUT/run-en" && mkdir -p "$OUT/run-en"
  (cd "$OUT/run" && cp -r $(ls | grep -v '^optimize$' | grep -v '\.log$\|\.err$') "$OUT/run-en/")
  opt "$OUT/run-en" en --n-confirm 1 --n-test 3
fi
for d in run run-en; do
  [ -d "$OUT/$d/optimize" ] || continue
  mkdir -p "$HERE/$d"
  cp "$OUT/$d/optimize/"{report.md,pareto.md,pareto.png,trials.jsonl,reference.json,config.json} "$HERE/$d/"
  cp "$OUT/$d/optimize/"{pick.json,pick_test.json} "$HERE/$d/" 2>/dev/null || true
  grep -E "Elapsed|Maximum resident" "$OUT/$d/optimize.err" > "$HERE/$d/time.txt" || true
done
cp "$OUT/run/report.md" "$HERE/run-report.md"
