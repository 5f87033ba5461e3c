"""`target_parameters` adapters (fused MoE experts) move both ways between this package and real upstream PEFT
0.21.2 with the same outputs: Qwen3-MoE (`(E, out, in)` stacks) and GPT-OSS (`is_transposed`, `(E, in, out)`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft import PeftModel
from tests.tuners.lora.test_target_parameters import EXPERTS, ids, logits, lora, tiny_moe
from tests.upstream_harness import run_upstream

pytestmark = pytest.mark.upstream

KINDS = ("qwen3_moe", "gpt_oss")

UPSTREAM_SIDE = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

root = Path(sys.argv[1])
spec = json.loads((root / "spec.json").read_text())
x = torch.load(root / "ids.pt")
report = {}
for kind in spec["kinds"]:
    folder = root / kind
    def base():
        return AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32).eval()
    # ours -> upstream
    model = PeftModel.from_pretrained(base(), folder / "ours")
    with torch.no_grad():
        torch.save(model(x).logits, folder / "up_on_ours.pt")
        torch.save(model.merge_and_unload()(x).logits, folder / "up_on_ours_merged.pt")
    # upstream -> ours
    torch.manual_seed(5)
    model = get_peft_model(base(), LoraConfig(target_modules=[], target_parameters=spec["targets"], r=2,
                                              lora_alpha=4, init_lora_weights=False))
    model.save_pretrained(folder / "up")
    with torch.no_grad():
        torch.save(model(x).logits, folder / "up_own.pt")
    report[kind] = sorted(model.base_model.targeted_parameter_names)
emit(report)
"""


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    root = tmp_path_factory.mktemp("target_params_interop")
    x = ids()
    torch.save(x, root / "ids.pt")
    ours = {}
    for kind in KINDS:
        folder = root / kind
        tiny_moe(kind).save_pretrained(folder / "base")
        model = lora(_base(folder))
        model.save_pretrained(folder / "ours")
        ours[kind] = logits(model, x)
    (root / "spec.json").write_text(json.dumps({"kinds": list(KINDS), "targets": EXPERTS}))
    report = run_upstream(UPSTREAM_SIDE, args=[str(root)], timeout=300).data
    return root, x, ours, report


def _base(folder):
    return AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_our_adapter_in_upstream(interop, kind):
    root, x, ours, _ = interop
    up = torch.load(root / kind / "up_on_ours.pt", weights_only=True)
    base = logits(_base(root / kind), x)
    assert (ours[kind] - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(up, ours[kind], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.load(root / kind / "up_on_ours_merged.pt", weights_only=True), ours[kind],
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_upstream_adapter_in_ours(interop, kind):
    root, x, _, report = interop
    model = PeftModel.from_pretrained(_base(root / kind), root / kind / "up")
    assert sorted(model.base_model.targeted_parameter_names) == report[kind]
    expected = torch.load(root / kind / "up_own.pt", weights_only=True)
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), expected, rtol=0, atol=1e-4)
