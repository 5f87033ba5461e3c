"""LoRA adapters on Conv1d, Conv3d, grouped Conv2d and MultiheadAttention move both ways between this fork and the
real upstream PEFT 0.21.2 (one upstream subprocess, see `tests/upstream_harness.py`):

1. both processes build the same tiny models (`MODELS_SRC`, executed on both sides) and load the same base weights
   from a file; this fork saves an adapter with random (nonzero) A and B and its outputs;
2. upstream loads that adapter and writes its outputs, then saves its own adapter (random A and B) and outputs;
3. the tests compare outputs both ways (max abs < 1e-5, fp32) and the file keys and shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft import LoraConfig, PeftModel, get_peft_model
from tests.upstream_harness import UpstreamUnavailable, ensure_upstream_peft, run_upstream

pytestmark = pytest.mark.upstream

TOL = 1e-5

MODELS_SRC = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "conv1d":
            self.conv = nn.Conv1d(4, 6, 3, padding=1)
        elif kind == "conv3d":
            self.conv = nn.Conv3d(3, 4, 3, stride=2, padding=1)
        elif kind == "conv2d_groups":
            self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        else:
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = nn.Linear(8 if kind == "mha" else 2, 3)

    def forward(self, x):
        h = self.mha(x, x, x)[0] if self.kind == "mha" else self.conv(x).flatten(2)[..., :2]
        return self.lin(h)


INPUT_SHAPES = {"conv1d": (2, 4, 7), "conv3d": (2, 3, 4, 4, 4), "conv2d_groups": (2, 4, 5, 5), "mha": (2, 5, 8)}
CONFIGS = {
    "conv1d": dict(r=4, lora_alpha=8, target_modules=["conv"]),
    "conv3d": dict(r=2, lora_alpha=3, target_modules=["conv", "lin"]),
    "conv2d_groups": dict(r=4, lora_alpha=4, target_modules=["conv"]),
    "mha": dict(r=4, lora_alpha=6, target_modules=["mha", "lin"]),
}
'''

UPSTREAM_SCRIPT = '''
import sys, torch
from peft import LoraConfig, PeftModel, get_peft_model

root = sys.argv[1]
ns = {}
exec(open(root + "/models.py").read(), ns)
for kind in ns["CONFIGS"]:
    d = f"{root}/{kind}"
    x = torch.load(d + "/x.pt")
    model = ns["Net"](kind)
    model.load_state_dict(torch.load(d + "/base.pt"))
    loaded = PeftModel.from_pretrained(model, d + "/ours").eval()
    with torch.no_grad():
        torch.save(loaded(x), d + "/upstream_on_ours.pt")
    model = ns["Net"](kind)
    model.load_state_dict(torch.load(d + "/base.pt"))
    torch.manual_seed(7)
    own = get_peft_model(model, LoraConfig(init_lora_weights=False, **ns["CONFIGS"][kind])).eval()
    with torch.no_grad():
        torch.save(own(x), d + "/upstream_own.pt")
    own.save_pretrained(d + "/upstream")
emit({"done": True})
'''

_NS: dict = {}
exec(MODELS_SRC, _NS)
KINDS = list(_NS["CONFIGS"])


def _fresh_base(kind: str, folder: Path) -> torch.nn.Module:
    model = _NS["Net"](kind)
    model.load_state_dict(torch.load(folder / "base.pt"))
    return model


@pytest.fixture(scope="module")
def interop(tmp_path_factory) -> Path:
    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    root = tmp_path_factory.mktemp("conv_mha_interop")
    (root / "models.py").write_text(MODELS_SRC, encoding="utf-8")
    for seed, kind in enumerate(KINDS):
        folder = root / kind
        folder.mkdir()
        torch.manual_seed(seed)
        base = _NS["Net"](kind)
        torch.save(base.state_dict(), folder / "base.pt")
        torch.save(torch.randn(*_NS["INPUT_SHAPES"][kind]), folder / "x.pt")
        torch.manual_seed(100 + seed)
        ours = get_peft_model(base, LoraConfig(init_lora_weights=False, **_NS["CONFIGS"][kind])).eval()
        with torch.no_grad():
            torch.save(ours(torch.load(folder / "x.pt")), folder / "ours_own.pt")
        ours.save_pretrained(folder / "ours")
    result = run_upstream(UPSTREAM_SCRIPT, args=[str(root)], timeout=600)
    assert result.data == {"done": True}
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_upstream_loads_our_adapter_with_equal_outputs(interop, kind):
    folder = interop / kind
    ours, theirs = torch.load(folder / "ours_own.pt"), torch.load(folder / "upstream_on_ours.pt")
    assert (ours - theirs).abs().max().item() < TOL
    base = _fresh_base(kind, folder)
    with torch.no_grad():
        assert (base(torch.load(folder / "x.pt")) - ours).abs().max().item() > 1e-3, "the adapter must change outputs"


@pytest.mark.parametrize("kind", KINDS)
def test_we_load_upstream_adapter_with_equal_outputs(interop, kind):
    folder = interop / kind
    loaded = PeftModel.from_pretrained(_fresh_base(kind, folder), folder / "upstream").eval()
    with torch.no_grad():
        ours = loaded(torch.load(folder / "x.pt"))
    assert (ours - torch.load(folder / "upstream_own.pt")).abs().max().item() < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_file_keys_and_shapes_match(interop, kind):
    folder = interop / kind
    ours = load_file(folder / "ours" / "adapter_model.safetensors")
    theirs = load_file(folder / "upstream" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if kind == "mha":
        assert "base_model.model.mha.base_layer.out_proj.lora_A.weight" in ours
        assert tuple(ours["base_model.model.mha.lora_B.weight"].shape) == (24, 4)
    if kind == "conv2d_groups":
        assert tuple(ours["base_model.model.conv.lora_B.weight"].shape) == (6, 2, 1, 1)  # (c_out, r / groups, 1, 1)
