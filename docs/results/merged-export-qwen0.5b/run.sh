#!/usr/bin/env bash
# The measurement behind docs/results/merged-export-qwen0.5b/ (2 shared CPU cores; ~15 minutes).
# 1. a quick `pyrefusal run` of the default model (English), unless RUN already holds a finished one;
# 2. a copy of it with the 0.5B optimize pick (docs/results/optimize-qwen0.5b/run/pick.json) for the weighted merge;
# 3. measure.py: export merged with llama.cpp's requantization alone (plain) and with the direction-aware re-fit,
#    in the base's types and with the edited matrices stored as Q8_0, each compared with the hook path
#    (8 prompts x 32 greedy tokens); the weighted pick is compared with its LoRA.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN=${RUN:-/tmp/mrun}
OUT=${OUT:-/tmp/merged-export-qwen0.5b}
[ -f "$RUN/results.json" ] || pyrefusal run --out "$RUN" --target-langs en --n-test 8 --no-capability \
  --max-new-tokens 24 2>&1 | tail -3
mkdir -p "$OUT/run-pick/optimize"
cp "$RUN"/{results.json,direction.npy} "$OUT/run-pick/"
cp "$HERE/../optimize-qwen0.5b/run/pick.json" "$OUT/run-pick/optimize/pick.json"
{
  echo "| variant | requant | edited matrices | residual (llama.cpp alone) | token_embd | attn_output | ffn_down | greedy agreement | teacher-forced | identical | max abs dlogit | KL | file | re-fit time | total time |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  python "$HERE/measure.py" "$RUN" "$OUT" plain refit plain-q8 refit-q8 f32
  python "$HERE/measure.py" "$OUT/run-pick" "$OUT" pick
} | tee "$OUT/table.md"
cp "$OUT"/*.report.json "$HERE/"
