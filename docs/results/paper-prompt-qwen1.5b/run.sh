#!/usr/bin/env bash
# The command that produced this directory (2 CPU cores, no GPU): docs/results/run-qwen1.5b again
# (same model, prompts, sizes, seed, conditions), with the paper's prompts: the user turn alone, no
# system turn (--prompt-format paper). run-qwen1.5b used the GGUF chat template, which adds Qwen's
# default system prompt "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
set -euo pipefail
cd "$(dirname "$0")/../../.."
TQDM_DISABLE=1 /usr/bin/time -v pyrefusal run \
  --model qwen2.5-coder-1.5b-instruct-q4_k_m \
  --data-dir ../shared/polyrefuse \
  --source-lang en --target-langs en,de,zh,ja \
  --n-train 32 --n-val 6 --n-test 16 --max-new-tokens 32 \
  --conditions baseline,ablation,random_ablation \
  --prompt-format paper \
  --threads 2 \
  --out docs/results/paper-prompt-qwen1.5b > docs/results/paper-prompt-qwen1.5b/run.log 2>&1
