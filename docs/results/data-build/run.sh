#!/usr/bin/env bash
# The commands that produced this directory (2 CPU cores). Builds the first 48 rows of the release's
# missing zh harmless_test, and of de harmless_test (removed from a copy of the release) to compare
# the local translation with the released Google translation. DATA is a writable copy of PolyRefuse.
set -euo pipefail
DATA=${DATA:-/tmp/poly}
cd "$(dirname "$0")"
for lang in zh de; do
  TQDM_DISABLE=1 /usr/bin/time -f "$lang: %e s wall, %M kB max RSS" pyrefusal data build "$lang" --data-dir "$DATA" \
    --translator-model qwen2.5-coder-1.5b-instruct-q4_k_m --splits test --kinds harmless --limit 48 \
    --max-new-tokens 256 2>&1 | grep -v '^llama\|^load\|^print_info' | tee -a run.log
  cp "$DATA/harmless_test_translated_$lang.json" "$DATA/harmless_test_translated_$lang.build.json" .
done
