"""DoRA and `lora_bias` adapters move both ways between this package and real upstream PEFT 0.21.2 (subprocess, see
`tests/upstream_harness.py`) with equal outputs and the same file keys and shapes."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from peft import LoraConfig, PeftModel, get_peft_model
from tests.upstream_harness import UpstreamUnavailable, ensure_upstream_peft, run_upstream

# The same tiny model on both sides (exec'd here and in the upstream subprocess).
MODEL_SRC = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.lin0 = nn.Linear(8, 9)
        self.lin1 = nn.Linear(9, 6, bias=False)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, ids):
        h = self.lin1(torch.tanh(self.lin0(self.emb(ids))))
        return self.conv(h.unsqueeze(1))

def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=g, dtype=param.dtype))
            elif "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype))
'''
_NS: dict = {}
exec(MODEL_SRC, _NS)  # noqa: S102
Net, perturb = _NS["Net"], _NS["perturb"]

CASES = {
    "dora": dict(target_modules=["emb", "lin0", "lin1", "conv"], use_dora=True, init_lora_weights=False, r=3,
                 lora_alpha=7),
    "dora_rslora_dropout": dict(target_modules=["lin0", "conv"], use_dora=True, init_lora_weights=False, r=4,
                                lora_alpha=3, use_rslora=True, lora_dropout=0.1),
    "lora_bias": dict(target_modules=["lin0", "conv"], lora_bias=True, init_lora_weights=False, r=2, lora_alpha=5),
}

UPSTREAM_SCRIPT = MODEL_SRC + '''
import json, os, sys
from safetensors.torch import load_file
from peft import LoraConfig, PeftModel, get_peft_model

root = sys.argv[1]
manifest = json.load(open(os.path.join(root, "manifest.json")))
ids = torch.load(os.path.join(root, "ids.pt"))
base_state = torch.load(os.path.join(root, "base.pt"))

def base():
    net = Net()
    net.load_state_dict(base_state)
    return net.eval()

report = {}
for name, config in manifest.items():
    case = os.path.join(root, name)
    ours = PeftModel.from_pretrained(base(), os.path.join(case, "ours")).eval()
    with torch.no_grad():
        out = ours(ids)
        merged = ours.merge_and_unload()(ids)
    torch.save({"ours_loaded": out, "ours_merged": merged}, os.path.join(case, "upstream_view.pt"))
    torch.manual_seed(1234)
    model = get_peft_model(base(), LoraConfig(**config))
    perturb(model, 99)
    model.eval()
    with torch.no_grad():
        torch.save(model(ids), os.path.join(case, "upstream_out.pt"))
    model.save_pretrained(os.path.join(case, "upstream"))
    report[name] = sorted(load_file(os.path.join(case, "upstream", "adapter_model.safetensors")))
emit(report)
'''


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    root = tmp_path_factory.mktemp("dora-interop")
    torch.manual_seed(0)
    base = Net().eval()
    ids = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(3))
    torch.save(base.state_dict(), root / "base.pt")
    torch.save(ids, root / "ids.pt")
    ours = {}
    for name, config in CASES.items():
        torch.manual_seed(1)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        perturb(model, 7)
        model.eval()
        with torch.no_grad():
            ours[name] = model(ids)
        model.save_pretrained(root / name / "ours")
    (root / "manifest.json").write_text(json.dumps(CASES))
    report = run_upstream(UPSTREAM_SCRIPT, args=[str(root)], timeout=300).data
    return {"root": root, "base": base, "ids": ids, "ours": ours, "report": report}


@pytest.mark.parametrize("name", CASES)
def test_our_adapter_in_upstream_gives_same_outputs(interop, name):
    view = torch.load(interop["root"] / name / "upstream_view.pt")
    ours = interop["ours"][name]
    assert not torch.allclose(ours, interop["base"](interop["ids"]), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(view["ours_loaded"], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(view["ours_merged"], ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_upstream_adapter_here_gives_same_outputs(interop, name):
    expected = torch.load(interop["root"] / name / "upstream_out.pt")
    model = PeftModel.from_pretrained(copy.deepcopy(interop["base"]), str(interop["root"] / name / "upstream"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(interop["ids"]), expected, rtol=0, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(model(interop["ids"]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_saved_keys_and_shapes_match_upstream(interop, name):
    ours = load_file(str(interop["root"] / name / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(interop["root"] / name / "upstream" / "adapter_model.safetensors"))
    assert sorted(ours) == interop["report"][name] == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    marker = "lora_magnitude_vector" if "dora" in name else "lora_B.bias"
    assert any(k.endswith(marker) for k in ours)


def test_upstream_config_reads_here(interop):
    config = LoraConfig.from_pretrained(str(interop["root"] / "dora" / "upstream"))
    assert config.use_dora is True and config.lora_bias is False
    config = LoraConfig.from_pretrained(str(interop["root"] / "lora_bias" / "upstream"))
    assert config.lora_bias is True and config.use_dora is False
