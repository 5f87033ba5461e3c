"""Upstream side of `tests/test_upstream_interop.py`; runs only through `tests/upstream_harness.run_upstream`, where
`peft` is upstream PEFT 0.21.2 and this repository is not importable (so: no imports from `tests`).

`sys.argv[1]` is a work folder holding `manifest.json` (written by the test). For every case it names:

- (a) load the adapter *this fork* saved (`ours_adapter`) onto the base model with upstream's
  `PeftModel.from_pretrained`, write the logits to `up_on_ours.pt`, and report upstream's view of it: the config it
  parsed, warnings, unexpected / missing adapter keys of `set_peft_model_state_dict`, and each LoRA layer's
  `(r, alpha, scaling)`;
- (b) build the same LoRA config with upstream's `get_peft_model`, give every trainable tensor seeded noise (so
  `lora_B` is nonzero and a `modules_to_save` head differs from the base), save it to `up_adapter`, and write its
  logits to `up_own.pt` and the plain base's logits to `up_base.pt`.

A case with a `second` config also has a second adapter named "second" (saved in the sub-folder `second/`): (a)
loads it with `load_adapter` and writes `up_on_ours_second.pt`, (b) adds it and writes `up_own_second.pt`, both with
"second" active. Model class `TinyNet` is a plain `nn.Module` (the same layers as `tests/helpers/tiny_models.py`'s,
loaded from `model.safetensors`), for Conv2d and Embedding targets outside transformers.

For every `unsupported` entry it saves an upstream adapter using a feature this fork lacks (e.g. DoRA).
The emitted JSON also holds upstream's `LoraConfig` field names and where `peft` was imported from.
"""

import dataclasses
import enum
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

import peft
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict


def jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return jsonable(dataclasses.asdict(value))
    return value


class TinyNet(nn.Module):
    """emb (64 x 8) -> conv 3x3 (8 -> 6) -> relu -> lin1 (96 -> 16) -> relu -> lin2 (16 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 8)
        self.conv = nn.Conv2d(8, 6, kernel_size=3, padding=1)
        self.lin1 = nn.Linear(96, 16)
        self.lin2 = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids).permute(0, 3, 1, 2)
        h = torch.relu(self.conv(h)).flatten(1)
        return self.lin2(torch.relu(self.lin1(h)))


def load_base(spec: dict) -> torch.nn.Module:
    if spec["model_class"] == "TinyNet":
        model = TinyNet()
        model.load_state_dict(load_file(os.path.join(spec["base_dir"], "model.safetensors")))
        return model.eval()
    cls = getattr(transformers, spec["model_class"])
    return cls.from_pretrained(spec["base_dir"], dtype=torch.float32).eval()


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()  # a fresh get_peft_model is in training mode (lora_dropout active), as upstream's is
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out).detach().clone()


def perturb(model: torch.nn.Module, seed: int, adapter: str = "") -> None:
    """Add N(0, 0.1^2) noise to every trainable tensor (lora_A/B, modules_to_save copies, trained biases), or, with
    `adapter`, to every tensor of that adapter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if (f".{adapter}." in name) if adapter else param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))


def scalings(model: torch.nn.Module, adapter: str = "default") -> dict:
    return {name: [module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter]]
            for name, module in model.named_modules() if isinstance(module, LoraLayer) and adapter in module.r}


def recorded(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, [f"{w.category.__name__}: {w.message}" for w in caught]


def load_ours(case: dict, spec: dict, inputs: dict) -> dict:
    """Direction (a): this fork's adapter in upstream."""
    folder = case["ours_adapter"]
    config, config_warnings = recorded(lambda: PeftConfig.from_pretrained(folder))
    model, load_warnings = recorded(lambda: PeftModel.from_pretrained(load_base(spec), folder))
    result = set_peft_model_state_dict(model, load_peft_weights(folder, device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    torch.save(logits(model, inputs), Path(case["dir"]) / "up_on_ours.pt")
    second = {}
    if case.get("second"):
        recorded(lambda: model.load_adapter(os.path.join(folder, "second"), adapter_name="second"))
        model.set_adapter("second")
        torch.save(logits(model, inputs), Path(case["dir"]) / "up_on_ours_second.pt")
        second = scalings(model, "second")
    return {
        "config_class": type(config).__name__, "config": jsonable(config.to_dict()),
        "config_warnings": config_warnings, "load_warnings": load_warnings, "model_class": type(model).__name__,
        "unexpected_keys": list(result.unexpected_keys), "missing_adapter_keys": missing,
        "scalings": scalings(model), "scalings_second": second,
    }


def save_own(case: dict, spec: dict, inputs: dict) -> dict:
    """Direction (b): an adapter made and saved by upstream."""
    base = load_base(spec)
    torch.save(logits(base, inputs), Path(case["dir"]) / "up_base.pt")
    model, _ = recorded(lambda: get_peft_model(base, LoraConfig(**case["config"])))
    perturb(model, case["seed"])
    torch.save(logits(model, inputs), Path(case["dir"]) / "up_own.pt")
    second = {}
    if case.get("second"):
        recorded(lambda: model.add_adapter("second", LoraConfig(**case["second"])))
        perturb(model, case["seed"] + 100, adapter="second")
        model.set_adapter("second")
        torch.save(logits(model, inputs), Path(case["dir"]) / "up_own_second.pt")
        second = scalings(model, "second")
        model.set_adapter("default")
    recorded(lambda: model.save_pretrained(case["up_adapter"]))
    return {"scalings": scalings(model), "scalings_second": second,
            "config": jsonable(model.peft_config["default"].to_dict())}


def main() -> None:
    work = Path(sys.argv[1])
    manifest = json.loads((work / "manifest.json").read_text())
    report = {"peft_file": peft.__file__, "peft_version": peft.__version__, "sys_path": sys.path,
              "lora_fields": [f.name for f in dataclasses.fields(LoraConfig)], "cases": {}}
    for name, case in manifest["cases"].items():
        spec = manifest["models"][case["model"]]
        inputs = torch.load(spec["inputs"], weights_only=True)
        report["cases"][name] = {"ours_in_upstream": load_ours(case, spec, inputs),
                                 "upstream_own": save_own(case, spec, inputs)}
    for entry in manifest["unsupported"]:
        model, _ = recorded(lambda e=entry: get_peft_model(load_base(manifest["models"][e["model"]]),
                                                           LoraConfig(**e["config"])))
        perturb(model, 0)
        recorded(lambda e=entry, m=model: m.save_pretrained(e["dir"]))
    emit(report)  # noqa: F821 (provided by the harness)


if __name__ == "__main__":
    main()
