#!/usr/bin/env bash
# DeepSpeed ZeRO-2 through the Trainer (TrainingArguments(deepspeed=examples/launch/deepspeed_zero2.json)):
# optimizer state and gradients partitioned, whole parameters on every GPU. Plain LoRA only: LoRA-GA's callback
# and LoraProAdamW train wrong under ZeRO without an error (docs/multi_gpu.md), and train.py refuses them.
#   pip install -e ".[deepspeed]"
#   MODEL=meta-llama/Llama-2-7b-hf DATASET=tatsu-lab/alpaca bash examples/launch/deepspeed_zero2.sh --method lora
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc_per_node "$NPROC" examples/launch/train.py \
    --deepspeed examples/launch/deepspeed_zero2.json \
    --model "${MODEL:-meta-llama/Llama-2-7b-hf}" --dataset "${DATASET:-tatsu-lab/alpaca}" --bf16 "$@"
