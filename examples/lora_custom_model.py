"""Plain LoRA on a custom (non-transformers) PyTorch model, against full fine-tuning and a frozen encoder.

An MLP (`DigitNet`: encoder fc1 -> fc2 -> fc3 with GELU, then a linear `head`) is pretrained on digits 0-4 of
scikit-learn's bundled 8x8 digits (offline), then adapted to digits 5-9 from a small training set with three
methods, all from the same pretrained weights and a fresh head:

- frozen encoder: only the head trains;
- LoRA (rank `--rank` on fc1, fc2, fc3; the head trains whole via `modules_to_save`);
- full fine-tuning.

It also checks the adapter round trip: saved, reloaded on a fresh copy of the pretrained model, and merged, the
model gives the same outputs.

    python examples/lora_custom_model.py            # a few seconds on a CPU
    python examples/lora_custom_model.py --smoke    # the same path, fewer steps
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F


class DigitNet(nn.Module):
    """`head(encoder(x))`, x: (batch, 64) pixel intensities in [0, 1]."""

    def __init__(self, hidden: int = 128, n_classes: int = 5) -> None:
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(
            fc1=nn.Linear(64, hidden), act1=nn.GELU(), fc2=nn.Linear(hidden, hidden), act2=nn.GELU(),
            fc3=nn.Linear(hidden, hidden), act3=nn.GELU()))
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def load_tasks(seed: int, n_target_train: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Source task (digits 0-4, all of them) and target task (digits 5-9 relabelled 0-4: a small seeded training
    set of `n_target_train` examples and the rest as the test set)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    src, tgt = y < 5, y >= 5
    perm = torch.randperm(int(tgt.sum()), generator=torch.Generator().manual_seed(seed))
    xt, yt = x[tgt][perm], y[tgt][perm] - 5
    if not 0 < n_target_train < len(yt):
        raise ValueError(f"Invalid n_target_train={n_target_train}: expected 1..{len(yt) - 1}.")
    return {"source": (x[src], y[src]), "target_train": (xt[:n_target_train], yt[:n_target_train]),
            "target_test": (xt[n_target_train:], yt[n_target_train:])}


def fit(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], steps: int, lr: float, seed: int,
        batch_size: int = 64) -> float:
    """AdamW on the trainable parameters, cross-entropy, seeded mini-batches; returns the last loss."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(-1) == y).float().mean())


def adapt(pretrained: DigitNet, method: str, rank: int, seed: int) -> nn.Module:
    """A copy of `pretrained` with a fresh head, set up for `method` (frozen / lora / full)."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    model.head.reset_parameters()
    if method == "frozen":
        model.encoder.requires_grad_(False)
        return model
    if method == "lora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["fc1", "fc2", "fc3"], modules_to_save=["head"])
        return get_peft_model(model, config)
    if method == "full":
        return model
    raise ValueError(f"Invalid method {method!r}: expected frozen, lora or full.")


def check_round_trip(peft_model: nn.Module, pretrained: DigitNet, x: torch.Tensor) -> float:
    """Max |difference| between the trained LoRA model, the adapter reloaded on a fresh copy, and the merge."""
    from peft import PeftModel

    peft_model.eval()
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        expected = peft_model(x)
        peft_model.save_pretrained(tmp)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(pretrained), tmp)
        again = reloaded(x)
        merged = reloaded.merge_and_unload()(x)
    return max(float((again - expected).abs().max()), float((merged - expected).abs().max()))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="fewer steps (same code path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--target-train", type=int, default=100, help="target-task training examples (default 100)")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    steps, pre_steps = (20, 60) if args.smoke else (args.steps, 600)
    torch.set_num_threads(1)  # a 64-128 wide MLP: one thread is fastest
    torch.manual_seed(args.seed)
    tasks = load_tasks(args.seed, args.target_train)
    pretrained = DigitNet()
    fit(pretrained, tasks["source"], pre_steps, lr=3e-3, seed=args.seed)
    print(f"pretrained on digits 0-4: accuracy {accuracy(pretrained, tasks['source']):.3f} (train)")
    lrs = {"frozen": 3e-3, "lora": 3e-3, "full": 1e-3}
    results = {}
    for method in ("frozen", "lora", "full"):
        model = adapt(pretrained, method, args.rank, args.seed)
        start = time.perf_counter()
        loss = fit(model, tasks["target_train"], steps, lrs[method], args.seed)
        results[method] = {"trainable": sum(q.numel() for q in model.parameters() if q.requires_grad),
                           "final_loss": loss, "test_accuracy": accuracy(model, tasks["target_test"]),
                           "seconds": time.perf_counter() - start, "lr": lrs[method]}
        if method == "lora":
            results[method]["round_trip_max_abs_diff"] = check_round_trip(model, pretrained,
                                                                          tasks["target_test"][0][:32])
    print(f"\ndigits 5-9 from {args.target_train} examples, {steps} steps, rank {args.rank}:")
    print("| method | lr | trainable params | final train loss | test accuracy |\n|---|---|---|---|---|")
    for method, r in results.items():
        print(f"| {method} | {r['lr']:g} | {r['trainable']:,} | {r['final_loss']:.4f} | {r['test_accuracy']:.3f} |")
    print(f"LoRA adapter reloaded and merged: max |diff| {results['lora']['round_trip_max_abs_diff']:.2e}")
    return results


if __name__ == "__main__":
    main()
