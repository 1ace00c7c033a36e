#!/usr/bin/env bash
# The command that produced this directory (2 CPU cores, no GPU): the English direction of
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M ablated (and added) in all 14 PolyRefuse languages, against a
# random direction of the same norm. Same train/val/test sampling as docs/results/run-qwen1.5b, 64
# generated tokens so that late refusals show in the by-budget table. Re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/../../.."
TQDM_DISABLE=1 /usr/bin/time -v pyrefusal run \
  --model qwen2.5-coder-1.5b-instruct-q4_k_m \
  --data-dir ../shared/polyrefuse \
  --source-lang en --target-langs en,ar,de,es,fr,it,ja,ko,nl,pl,ru,th,yo,zh \
  --n-train 32 --n-val 6 --n-test 16 --max-new-tokens 64 \
  --conditions baseline,ablation,induce,random_ablation \
  --threads 2 \
  --out docs/results/universality-qwen1.5b 2>&1 | grep -v '^{\|^ "\|^}' | tee docs/results/universality-qwen1.5b/run.log
