"""LoRA-Pro on ViT-base / CIFAR-100 (image classification), against LoRA and full fine-tuning.

The model is `google/vit-base-patch16-224-in21k` with a new 100-way head (`classifier`, trained whole); LoRA and
LoRA-Pro adapt the attention projections and the MLP (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `fc1`, `fc2` in
transformers 5). LoRA-Pro uses `peft.optimizers.LoraProAdamW`
(`--mode full`: the paper's Algorithm 2; `--mode efficient`: LoRA's memory).

    # GPU, real model and data (needs `pip install datasets` and network access)
    python examples/lorapro_vit_cifar100.py --method lorapro --mode full
    python examples/lorapro_vit_cifar100.py --method lora --lr 1e-3
    # offline, seconds: a tiny random ViT (32x32 images, patch 8) and random images, same code path
    python examples/lorapro_vit_cifar100.py --smoke --method lorapro

Defaults: rank 8, alpha 16, batch 64, 1 epoch, lr 1e-4 for LoRA-Pro and full fine-tuning, 1e-3 for LoRA, warm-up
3% then linear decay, gradient clipping 1.0 (our choices; check the paper's before comparing numbers).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repro_common as rc  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]  # transformers 5 ViT names
DEFAULT_LR = {"lorapro": 1e-4, "lora": 1e-3, "full": 1e-4}


def load_real(args):
    """(model, train (pixels fn, labels), test (pixels fn, labels)); images are processed batch by batch."""
    from datasets import load_dataset  # lazy: only the real run needs it
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(args.model)
    data = load_dataset("cifar100")
    model = AutoModelForImageClassification.from_pretrained(args.model, num_labels=100)

    def split(name, limit=None):
        rows = data[name] if limit is None else data[name].select(range(min(limit, len(data[name]))))

        def pixels(idx):
            images = [rows[int(i)]["img"].convert("RGB") for i in idx]
            return processor(images, return_tensors="pt")["pixel_values"]

        return pixels, torch.tensor(rows["fine_label"])

    return model, split("train"), split("test", args.eval_limit)


def load_smoke(args):
    """A tiny random ViT (image 32, patch 8, hidden 32, 2 blocks) and random 32x32 images with 100 labels."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=100)
    rc.set_seed(args.seed)
    model = ViTForImageClassification(config)
    gen = torch.Generator().manual_seed(args.seed)

    def split(n):
        images = torch.randn(n, 3, 32, 32, generator=gen)
        return (lambda idx: images[idx]), torch.randint(0, 100, (n,), generator=gen)

    return model, split(64), split(32)


def batch_fn(split, batch_size: int, seed: int):
    pixels, labels = split
    gen = torch.Generator().manual_seed(seed)

    def epoch():
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(labels) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield {"pixel_values": pixels(idx), "labels": labels[idx]}

    return epoch


@torch.no_grad()
def accuracy(model, split, batch_size: int = 128) -> float:
    model.eval()
    pixels, labels = split
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch_size):
        idx = torch.arange(i, min(len(labels), i + batch_size))
        logits = model(pixel_values=pixels(idx).to(device)).logits
        correct += int((logits.argmax(-1).cpu() == labels[idx]).sum())
    model.train()
    return correct / len(labels)


def setup(model, args):
    """(model, optimizer) for --method."""
    from peft import LoraConfig, get_peft_model

    lr = args.lr or DEFAULT_LR[args.method]
    if args.method == "full":
        return model, rc.adamw(model, lr)
    common = {"r": args.rank, "lora_alpha": args.alpha, "target_modules": TARGETS, "modules_to_save": ["classifier"]}
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(**common))
        return model, rc.adamw(model, lr)
    from peft import LoraProConfig

    model = get_peft_model(model, LoraProConfig(mode=args.mode, **common))
    return model, rc.lorapro_optimizer(model, lr)


def main(argv: list[str] | None = None) -> dict:
    p = rc.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="google/vit-base-patch16-224-in21k")
    p.add_argument("--method", choices=["lorapro", "lora", "full"], default="lorapro")
    p.add_argument("--mode", choices=["full", "efficient"], default="full", help="LoRA-Pro mode")
    p.add_argument("--eval-limit", type=int, default=None)
    p.set_defaults(batch_size=64)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.steps = 16, args.steps or 3
    device, dtype = rc.device_and_dtype(args.smoke)
    rc.set_seed(args.seed)
    model, train, test = (load_smoke if args.smoke else load_real)(args)
    model, optimizer = setup(model.to(device), args)
    steps = args.steps or len(train[1]) // (args.batch_size * args.grad_accum)
    print(f"{args.method} ({args.mode}): {rc.trainable_parameters(model):,} trainable parameters, {steps} steps")
    losses = rc.train(model, optimizer, rc.cycle(batch_fn(train, args.batch_size, args.seed)), steps,
                      args.grad_accum, autocast_dtype=dtype if device.type == "cuda" else None)
    result = {"method": args.method, "mode": args.mode, "final_loss": losses[-1], "accuracy": accuracy(model, test)}
    if args.output_dir and args.method != "full":
        model.save_pretrained(args.output_dir)
    print(result)
    return result


if __name__ == "__main__":
    main()
