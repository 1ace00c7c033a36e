#!/usr/bin/env bash
# The command that produced this directory (2 CPU cores, no GPU): docs/results/run-qwen1.5b again
# (same model, prompts, sizes and seed) with every candidate made orthogonal to the harmless mean
# before selection (--direction-projection harmless). Baseline rows are those of run-qwen1.5b
# (same prompts, greedy decoding), so only the ablation is generated here. Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/../../.."
TQDM_DISABLE=1 /usr/bin/time -v pyrefusal run \
  --model qwen2.5-coder-1.5b-instruct-q4_k_m \
  --data-dir ../shared/polyrefuse \
  --source-lang en --target-langs en,de,zh,ja \
  --n-train 32 --n-val 6 --n-test 16 --max-new-tokens 32 \
  --conditions ablation \
  --direction-projection harmless \
  --threads 2 \
  --out docs/results/projected-qwen1.5b 2>&1 | grep -v '^{\|^ "\|^}' | tee docs/results/projected-qwen1.5b/run.log
