#!/usr/bin/env bash
# DeepSpeed ZeRO-3 through the Trainer (examples/launch/deepspeed_zero3.json): parameters partitioned too; the
# adapter is gathered whole when saved. Plain LoRA only, as for ZeRO-2 (docs/multi_gpu.md).
#   MODEL=meta-llama/Llama-2-7b-hf DATASET=tatsu-lab/alpaca bash examples/launch/deepspeed_zero3.sh --method lora
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc_per_node "$NPROC" examples/launch/train.py \
    --deepspeed examples/launch/deepspeed_zero3.json \
    --model "${MODEL:-meta-llama/Llama-2-7b-hf}" --dataset "${DATASET:-tatsu-lab/alpaca}" --bf16 "$@"
