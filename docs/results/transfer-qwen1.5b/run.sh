#!/usr/bin/env bash
# The command that produced this directory (2 CPU cores, no GPU). Re-running resumes; the log is appended.
# Second invocation: the random-direction control row (added to `pyrefusal transfer` after the first).
set -euo pipefail
cd "$(dirname "$0")/../../.."
TQDM_DISABLE=1 /usr/bin/time -v pyrefusal transfer \
  --model qwen2.5-coder-1.5b-instruct-q4_k_m \
  --data-dir ../shared/polyrefuse \
  --sources en,de,zh --targets en,de,zh,ja \
  --n-train 32 --n-val 6 --n-test 16 --max-new-tokens 32 \
  --threads 2 \
  --out docs/results/transfer-qwen1.5b 2>&1 | tee -a docs/results/transfer-qwen1.5b/run.log
