#!/usr/bin/env bash
# FSDP2 from an accelerate config file (examples/launch/accelerate_fsdp2.yaml): the Trainer takes the FSDP plugin
# that `accelerate launch` describes in the environment; train.py gets no --fsdp2. LoRA, LoRA-GA, LoRA-Pro.
#   MODEL=meta-llama/Llama-2-7b-hf DATASET=tatsu-lab/alpaca bash examples/launch/accelerate_fsdp2.sh --method lora
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec accelerate launch --config_file examples/launch/accelerate_fsdp2.yaml --num_processes "$NPROC" \
    examples/launch/train.py \
    --model "${MODEL:-meta-llama/Llama-2-7b-hf}" --dataset "${DATASET:-tatsu-lab/alpaca}" --bf16 "$@"
