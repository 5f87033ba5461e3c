#!/usr/bin/env bash
# FSDP2 through the Trainer: TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2}) (train.py --fsdp2);
# one FSDP unit per decoder block, full state dicts in the checkpoints. LoRA, LoRA-GA, LoRA-Pro.
#   MODEL=meta-llama/Llama-2-7b-hf DATASET=tatsu-lab/alpaca bash examples/launch/torchrun_fsdp2.sh --method loraga
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc_per_node "$NPROC" examples/launch/train.py --fsdp2 \
    --model "${MODEL:-meta-llama/Llama-2-7b-hf}" --dataset "${DATASET:-tatsu-lab/alpaca}" --bf16 "$@"
