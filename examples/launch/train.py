"""Train a LoRA, LoRA-GA or LoRA-Pro adapter with transformers' Trainer, on one GPU or several.

The launchers next to this file run it (docs/multi_gpu.md says which combination is tested where):

    bash examples/launch/torchrun_ddp.sh        --method lora           # DDP
    bash examples/launch/torchrun_fsdp2.sh      --method lorapro        # FSDP2 (TrainingArguments fsdp_version 2)
    bash examples/launch/accelerate_fsdp2.sh    --method loraga         # FSDP2 from accelerate_fsdp2.yaml
    bash examples/launch/deepspeed_zero2.sh     --method lora           # DeepSpeed ZeRO-2 (plain LoRA only)
    python examples/launch/train.py --smoke                             # tiny random Llama, offline, seconds

The only method-specific lines are in `build`: the config, `LoraGACallback` for LoRA-GA (estimation and init at
the start of `train()`, from the Trainer's own batches), `optimizer_cls_and_kwargs=(LoraProAdamW, ...)` for LoRA-Pro.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings

import torch

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["lora", "loraga", "lorapro"], default="lora")
    p.add_argument("--mode", choices=["full", "efficient"], default="full", help="LoRA-Pro's mode (docs/lorapro.md)")
    p.add_argument("--model", default=None, help="a causal LM on the Hub or a local folder")
    p.add_argument("--dataset", default=None, help="a Hub dataset, or a local .json/.jsonl/.txt file")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--targets", default=TARGETS, help="comma-separated module names")
    p.add_argument("--loraga-iters", type=int, default=8, help="LoRA-GA: estimation batches")
    p.add_argument("--lr", type=float, default=2e-4, help="LoRA-GA and LoRA-Pro (full) want full fine-tuning's lr")
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fsdp2", action="store_true", help="TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2})")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed config JSON (examples/launch/deepspeed_zero*.json)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, random tokens, 4 steps, offline")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.rank, args.alpha, args.loraga_iters, args.lr = 4, 2, 2, 4, 2, 1e-2
    elif args.model is None or args.dataset is None:
        p.error("--model and --dataset are required (or --smoke)")
    return args


def check_setup(args: argparse.Namespace) -> None:
    """Refuse what is known not to work (docs/multi_gpu.md) instead of training something else."""
    if args.deepspeed and args.method != "lora":
        raise SystemExit(f"--method {args.method} with DeepSpeed ZeRO trains wrong without an error (ZeRO keeps its "
                         "own fp32 copy of A and B and its own gradients): use DDP or FSDP2 (docs/multi_gpu.md).")
    if (args.fsdp2 or args.deepspeed) and not torch.cuda.is_available():
        raise SystemExit("FSDP2 / DeepSpeed through accelerate need GPUs: on a CPU-only machine accelerate 1.16 drops "
                         "the FSDP plugin (DDP instead) and gives each DeepSpeed process rank 0 (docs/multi_gpu.md).")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def load_data(args: argparse.Namespace):
    """(model, train dataset, collator)."""
    if args.smoke:
        ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
        return tiny_llama(), [{"input_ids": row, "labels": row} for row in ids], None
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    suffix = args.dataset.rsplit(".", 1)[-1]
    if suffix in ("json", "jsonl", "txt"):
        data = load_dataset("text" if suffix == "txt" else "json", data_files=args.dataset, split="train")
    else:
        data = load_dataset(args.dataset, split="train")
    data = data.map(lambda batch: tokenizer(batch[args.text_column], truncation=True, max_length=args.max_length),
                    batched=True, remove_columns=data.column_names)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    return model, data, DataCollatorForLanguageModeling(tokenizer, mlm=False)


def build(args: argparse.Namespace, base) -> tuple:
    """(PeftModel, extra Trainer keyword arguments) for the method."""
    from peft import LoraConfig, LoraGACallback, LoraGAConfig, LoraProConfig, get_peft_model
    from peft.optimizers import LoraProAdamW

    common = dict(task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha, target_modules=args.targets.split(","))
    if args.method == "loraga":  # the paper's setting: rsLoRA; the callback initialises at the start of train()
        config = LoraGAConfig(use_rslora=True, iters=args.loraga_iters, **common)
        with warnings.catch_warnings():  # "No LoraGAContext ...": expected, LoraGACallback initialises later
            warnings.filterwarnings("ignore", message="No LoraGAContext", category=UserWarning)
            model = get_peft_model(base, config)
        return model, {"callbacks": [LoraGACallback()]}
    if args.method == "lorapro":  # the Trainer does not pass its learning rate to an optimizer class: lr goes here
        model = get_peft_model(base, LoraProConfig(mode=args.mode, **common))
        return model, {"optimizer_cls_and_kwargs": (LoraProAdamW, {"lr": args.lr})}
    return get_peft_model(base, LoraConfig(**common)), {}


def main(argv: list[str] | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    args = parse_args(argv)
    check_setup(args)
    out = args.output_dir or tempfile.mkdtemp(prefix=f"launch_{args.method}_")
    parallel = {"fsdp": True, "fsdp_config": {"fsdp_version": 2}} if args.fsdp2 else {}
    if args.deepspeed:
        with open(args.deepspeed) as f:
            parallel = {"deepspeed": json.load(f)}
    training = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), weight_decay=0.0, bf16=args.bf16, logging_steps=max(1, args.steps // 50),
        save_strategy="steps", save_steps=max(1, args.steps // 4), report_to=[], seed=0,
        use_cpu=not torch.cuda.is_available(), **parallel)  # without use_cpu, torchrun on a CPU gives 1-process runs
    model, data, collator = load_data(args)
    model, extra = build(args, model)
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collator, **extra)
    trainer.train()
    trainer.save_model(f"{out}/final")  # a plain LoRA adapter folder (LoRA-GA: rank 2r, for the original weights)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        print(json.dumps({"output_dir": out, "first_loss": losses[0], "last_loss": losses[-1]}))
    return {"output_dir": out, "losses": losses}


if __name__ == "__main__":
    main()
