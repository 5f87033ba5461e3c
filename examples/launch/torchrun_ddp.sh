#!/usr/bin/env bash
# DDP on one machine: every GPU holds the whole model, gradients are all-reduced. LoRA, LoRA-GA, LoRA-Pro.
#   MODEL=meta-llama/Llama-2-7b-hf DATASET=tatsu-lab/alpaca bash examples/launch/torchrun_ddp.sh --method lorapro
# Extra arguments go to examples/launch/train.py (--method, --mode, --rank, --lr, --steps, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc_per_node "$NPROC" examples/launch/train.py \
    --model "${MODEL:-meta-llama/Llama-2-7b-hf}" --dataset "${DATASET:-tatsu-lab/alpaca}" --bf16 "$@"
