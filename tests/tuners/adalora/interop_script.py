"""Both sides of the AdaLoRA interop tests: imported by test_interop.py (this fork) and run by
`tests.upstream_harness.run_upstream` (upstream PEFT 0.21.2). Uses only the API the two share.

Script usage: `MANIFEST.json`, a list of jobs run in order (one process: upstream's import cost is paid once):
`{"op": "save", "dir", "kind", "config", "steps"}` (build, adapt, randomize or train with update_and_allocate, save,
write the live outputs to dir/live.pt) or `{"op": "load", "dir", "kind"}` (load dir, write outputs to dir/loaded.pt
and the loss of a trainable reload, penalty included, to dir/loaded_loss.pt).
"""

import json
import sys

import torch
from torch import nn

F64 = torch.float64


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "seq":  # Conv2d + Linear
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 4)).to(F64).eval()
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=3)
        return BertForSequenceClassification(config).to(F64).eval()
    if kind == "gpt2":  # Conv1D
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
        return GPT2LMHeadModel(config).to(F64).eval()
    raise ValueError(kind)


def inputs(kind: str, labels: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "seq":
        return {"input": torch.randn(2, 2, 4, 4, generator=g, dtype=F64)}
    ids = torch.randint(0, 64, (3, 6), generator=g)
    out = {"input_ids": ids}
    if labels:
        out["labels"] = torch.tensor([0, 2, 1]) if kind == "bert" else ids
    return out


def output(kind: str, out) -> torch.Tensor:
    return out if kind == "seq" else out.logits


def randomize(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)


def train(model: nn.Module, kind: str, steps: int) -> None:
    """Adam with AdaLoRA's allocation after each step (the config's schedule must end within `steps`)."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs(kind, labels=True)
    for step in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


def save(folder: str, kind: str, config: dict, steps: int) -> None:
    from peft import AdaLoraConfig, get_peft_model

    model = get_peft_model(build(kind), AdaLoraConfig(**config))
    if steps:
        train(model, kind, steps)
    else:
        randomize(model)
    model.save_pretrained(folder)
    with torch.no_grad():
        torch.save(output(kind, model(**inputs(kind))), f"{folder}/live.pt")


def load(folder: str, kind: str) -> None:
    from peft import PeftModel

    model = PeftModel.from_pretrained(build(kind), folder)
    with torch.no_grad():
        torch.save(output(kind, model(**inputs(kind))), f"{folder}/loaded.pt")
    if kind != "seq":
        trainable = PeftModel.from_pretrained(build(kind), folder, is_trainable=True).eval()
        with torch.no_grad():
            torch.save(trainable(**inputs(kind, labels=True)).loss, f"{folder}/loaded_loss.pt")



if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for job in json.load(f):
            if job["op"] == "save":
                save(job["dir"], job["kind"], job["config"], job["steps"])
            else:
                load(job["dir"], job["kind"])
