#!/usr/bin/env bash
# The command that produced this directory (2 CPU cores, no GPU): the paper's committed sweep
# (method.md §8.1, "ja_vector_sweep") on Qwen2.5-Coder-1.5B-Instruct Q4_K_M. The direction is found
# and selected from Japanese train/val prompts only, then ablated (and run in the paper's
# harm_ablation order: ablation everywhere plus +r at the selected layer) on the test prompts of all
# 14 PolyRefuse languages. Sizes, seed and token budget as docs/results/universality-qwen1.5b, so the
# baselines of the two directories are the same generations. Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/../../.."
TQDM_DISABLE=1 /usr/bin/time -v pyrefusal run \
  --model qwen2.5-coder-1.5b-instruct-q4_k_m \
  --data-dir ../shared/polyrefuse \
  --source-lang ja --target-langs en,ar,de,es,fr,it,ja,ko,nl,pl,ru,th,yo,zh \
  --n-train 32 --n-val 6 --n-test 16 --max-new-tokens 64 \
  --conditions baseline,ablation,harm_ablation \
  --threads 2 \
  --out docs/results/universality-ja-qwen1.5b 2>&1 | grep -v '^{\|^ "\|^}' | tee docs/results/universality-ja-qwen1.5b/run.log
