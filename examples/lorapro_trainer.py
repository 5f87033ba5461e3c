"""Train a LoRA-Pro adapter with transformers' Trainer, offline, in seconds.

A tiny random Llama (built from `LlamaConfig`, nothing downloaded) learns to continue a repeating token pattern.
The only LoRA-Pro-specific lines are the config (`LoraProConfig`) and the optimizer (`LoraProAdamW`, handed to the
Trainer through `optimizers=`); gradient accumulation, clipping, the schedule and checkpoints are the Trainer's.

    python examples/lorapro_trainer.py                     # 60 steps, mode "full"
    python examples/lorapro_trainer.py --mode efficient    # LoRA's memory
    python examples/lorapro_trainer.py --smoke             # 4 steps: the code path only
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def make_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class PatternTokens(torch.utils.data.Dataset):
    """Sequences `k, k+1, ..., k+15` (mod 64): an easy pattern, so the loss visibly falls."""

    def __init__(self, n: int = 64, length: int = 16) -> None:
        starts = torch.randint(0, 64, (n, 1), generator=torch.Generator().manual_seed(1))
        self.ids = (starts + torch.arange(length)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["full", "efficient"], default="full")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-2,
                   help="full mode: full fine-tuning's lr; efficient mode: LoRA's lr (docs/lorapro.md). 1e-2 suits "
                        "both on this toy model")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="4 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps = 4
    return args


def main(argv: list[str] | None = None) -> dict:
    from transformers import Trainer, TrainingArguments

    from peft import LoraProConfig, PeftModel, get_peft_model
    from peft.optimizers import LoraProAdamW

    args = parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix="lorapro_trainer_")
    config = LoraProConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_rslora=True, mode=args.mode,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(make_model(), config)
    optimizer = LoraProAdamW(model, lr=args.lr, weight_decay=0.0)
    training = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=PatternTokens(), optimizers=(optimizer, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.save_pretrained(out)
    reloaded = PeftModel.from_pretrained(make_model(), out)
    ids = PatternTokens(n=2).ids
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-6)
    print(f"mode={args.mode}: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; "
          f"adapter saved to {out}; reloaded output identical: {same}")
    return {"losses": losses, "output_dir": out, "reload_matches": same}


if __name__ == "__main__":
    main()
