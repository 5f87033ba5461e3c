"""LoRA-Pro on Llama-2-7B: train on MetaMathQA (100k), evaluate on GSM8K (the LoRA-Pro paper's math experiment),
in `full` mode (the paper's Algorithm 2: Adam moments of the equivalent gradient, m x n per layer) or `efficient`
mode (adjusted gradients, then per-factor AdamW: LoRA's memory). The optimizer is `peft.optimizers.LoraProAdamW`,
an ordinary `torch.optim.Optimizer`: gradient accumulation and clipping happen before its step, as in any loop.

    # GPU, real model and data (needs `pip install datasets`, network access and the Llama-2 licence)
    python examples/lorapro_llama_metamath.py --mode full
    python examples/lorapro_llama_metamath.py --mode efficient --quant 4bit
    # offline, seconds: tiny random Llama, char tokenizer, arithmetic records, same code path
    python examples/lorapro_llama_metamath.py --smoke --mode full

Defaults: rank 8, alpha 16, all linear layers of the blocks, batch 32 (use --grad-accum on small GPUs), one epoch,
lr 2e-5 (LoRA-Pro's update does not depend on the scale s, so it wants full fine-tuning's learning rate), warm-up
3% then linear decay, gradient clipping 1.0. These are our reading of the paper's setup: check before comparing.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metamath_common as mm  # noqa: E402
import repro_common as rc  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args, path: str, device, dtype):
    """(LoRA-Pro model, LoraProAdamW)."""
    from peft import LoraProConfig, get_peft_model, prepare_model_for_kbit_training

    model = mm.load_model(path, args.quant, dtype, device)
    if args.quant == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=not args.smoke)
    config = LoraProConfig(mode=args.mode, r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS,
                           task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    return model, rc.lorapro_optimizer(model, lr=args.lr or 2e-5)


def main(argv: list[str] | None = None) -> dict:
    p = rc.base_parser(__doc__.split("\n\n")[0])
    mm.add_args(p)
    p.add_argument("--mode", choices=["full", "efficient"], default="full")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps, args.max_new_tokens = 4, args.steps or 3, 8
    device, dtype = rc.device_and_dtype(args.smoke)
    rc.set_seed(args.seed)
    tok, path, batches, questions, answers = mm.prepare(args, device, dtype)
    model, optimizer = build(args, path, device, dtype)
    steps = args.steps or args.train_size // (args.batch_size * args.grad_accum)
    print(f"LoRA-Pro {args.mode} ({args.quant}): {rc.trainable_parameters(model):,} trainable parameters, "
          f"{steps} steps")
    losses = rc.train(model, optimizer, rc.cycle(batches), steps, args.grad_accum,
                      autocast_dtype=dtype if device.type == "cuda" else None)
    save_dir = args.output_dir or tempfile.mkdtemp(prefix="lorapro_metamath_")
    model.save_pretrained(save_dir)
    result = {"mode": args.mode, "quant": args.quant, "final_loss": losses[-1], "saved": save_dir,
              "gsm8k_accuracy": mm.gsm8k_accuracy(model, tok, questions, answers, args.max_new_tokens)}
    print(result)
    return result


if __name__ == "__main__":
    main()
