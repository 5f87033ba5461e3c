"""Interop harness shared by the LoHa and LoKr tests: adapters move both ways with upstream PEFT 0.21.2.

`run_interop(root, method, cases)`: for each case (a tiny model, a dtype, a config dict) this fork builds the
adapter, adds seeded noise to every trainable tensor, records its output and saves it; then ONE upstream subprocess
loads each of our adapters (recording its output) and saves its own adapter for the same config (with its output);
finally this fork loads each upstream adapter. The returned dict per case holds the four outputs and both folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.upstream_harness import UpstreamUnavailable, ensure_upstream_peft, run_upstream

# Built in both processes from this source, so the architectures are identical; weights travel through files.
MODELS_SRC = '''
import torch
from torch import nn

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(32, 64), nn.Linear(64, 24), nn.Linear(24, 4)
    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(4, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=2)
        self.conv2 = nn.Conv2d(8, 12, 1)
        self.lin = nn.Linear(12, 6)
    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(torch.relu(self.conv0(x))))))
        return self.lin(h.mean(dim=(2, 3)))

class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 6, 1)
    def forward(self, x):
        return self.c1(torch.relu(self.c0(x))).mean(dim=2)

MODELS = {"mlp": (MLP, (5, 32)), "conv": (ConvNet, (3, 4, 8, 8)), "conv1d": (Conv1dNet, (3, 4, 10))}

def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
'''

_ns: dict = {}
exec(MODELS_SRC, _ns)  # noqa: S102  (our own constant source, shared with the upstream subprocess)
MODELS, perturb = _ns["MODELS"], _ns["perturb"]

UPSTREAM_SCRIPT = MODELS_SRC + '''
import json, sys
from pathlib import Path
import peft
from peft import PeftModel, get_peft_model

root = Path(sys.argv[1])
manifest = json.loads((root / "manifest.json").read_text())
config_cls = getattr(peft, manifest["config_cls"])

def base(case):
    model = MODELS[case["model"]][0]()
    model.load_state_dict(torch.load(root / f"base_{case['model']}.pt"))
    return model.to(getattr(torch, case["dtype"])).eval()

for name, case in manifest["cases"].items():
    d = Path(case["dir"])
    x = torch.load(root / f"x_{case['model']}.pt").to(getattr(torch, case["dtype"]))
    loaded = PeftModel.from_pretrained(base(case), case["ours_dir"]).eval()
    with torch.no_grad():
        torch.save(loaded(x), d / "upstream_on_ours.pt")
    model = get_peft_model(base(case), config_cls(**case["config"]))
    perturb(model, case["seed"] + 1000)
    model.eval()
    with torch.no_grad():
        torch.save(model(x), d / "upstream_own.pt")
    model.save_pretrained(case["up_dir"])
    with torch.no_grad():
        torch.save(model.merge_and_unload()(x), d / "upstream_own_merged.pt")
emit({"version": peft.__version__, "file": peft.__file__})
'''


def run_interop(root: Path, method_config_cls: type, cases: dict) -> dict:
    """Run the round trips for `cases` ({name: {"model", "dtype", "config"}}); see the module docstring."""
    from peft import PeftModel, get_peft_model

    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    for model_name, (cls, x_shape) in MODELS.items():
        torch.manual_seed(0)
        torch.save(cls().state_dict(), root / f"base_{model_name}.pt")
        torch.save(torch.randn(*x_shape, generator=torch.Generator().manual_seed(1)), root / f"x_{model_name}.pt")

    def base(case):
        model = MODELS[case["model"]][0]()
        model.load_state_dict(torch.load(root / f"base_{case['model']}.pt"))
        return model.to(getattr(torch, case["dtype"])).eval()

    manifest = {"config_cls": method_config_cls.__name__, "cases": {}}
    results = {}
    for seed, (name, case) in enumerate(cases.items(), start=1):
        d = root / name
        d.mkdir()
        entry = dict(case, seed=seed, dir=str(d), ours_dir=str(d / "ours"), up_dir=str(d / "upstream"))
        manifest["cases"][name] = entry
        x = torch.load(root / f"x_{case['model']}.pt").to(getattr(torch, case["dtype"]))
        model = get_peft_model(base(case), method_config_cls(**case["config"]))
        perturb(model, seed)
        model.eval()
        with torch.no_grad():
            ours = model(x)
        model.save_pretrained(entry["ours_dir"])
        results[name] = {"x": x, "ours": ours, "ours_dir": entry["ours_dir"], "up_dir": entry["up_dir"]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = run_upstream(UPSTREAM_SCRIPT, args=[str(root)], timeout=240).data
    assert report["version"] == "0.21.2"
    for name, case in manifest["cases"].items():
        d, res = Path(case["dir"]), results[name]
        res["upstream_on_ours"] = torch.load(d / "upstream_on_ours.pt")
        res["upstream_own"] = torch.load(d / "upstream_own.pt")
        res["upstream_own_merged"] = torch.load(d / "upstream_own_merged.pt")
        loaded = PeftModel.from_pretrained(base(case), case["up_dir"]).eval()
        with torch.no_grad():
            res["ours_on_upstream"] = loaded(res["x"])
            res["ours_on_upstream_merged"] = loaded.merge_and_unload()(res["x"])
    return results


def tolerance(dtype_name: str) -> float:
    return 1e-6 if dtype_name == "float32" else 1e-12
