"""EVA and CorDA against real upstream PEFT 0.21.2: the same CorDA factors / residual, EVA adapters load there."""

import copy

import pytest
import torch
from torch import nn

from peft import CordaConfig, EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora.corda import preprocess_corda
from tests.upstream_harness import run_upstream

NET = '''
import torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 12)
        self.lin1 = nn.Linear(12, 6)
    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))
'''
exec(NET)  # the same module class on both sides


def _base(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()  # noqa: F821  (defined by exec above)
    torch.save(model.state_dict(), tmp_path / "base.pt")
    data = torch.rand(40, 16)  # positive: both sides scale inputs by the same max
    torch.save(data, tmp_path / "data.pt")
    return model, data


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_upstream(tmp_path, method):
    model, data = _base(tmp_path)
    config = LoraConfig(init_lora_weights="corda", target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                        corda_config=CordaConfig(corda_method=method))
    preprocess_corda(model, config, run_model=lambda: model(data))
    ours = get_peft_model(model, config)
    run_upstream(NET + '''
import sys, types, dataclasses
from pathlib import Path
sys.modules.setdefault("attr", types.SimpleNamespace(dataclass=dataclasses.dataclass))  # upstream imports attrs here
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
d = Path(sys.argv[1])
model = Net().eval(); model.load_state_dict(torch.load(d / "base.pt"))
data = torch.load(d / "data.pt")
config = LoraConfig(init_lora_weights="corda", target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                    corda_config=CordaConfig(corda_method=sys.argv[2]))
preprocess_corda(model, config, run_model=lambda: model(data))
m = get_peft_model(model, config)
torch.save({k: v for k, v in m.state_dict().items()}, d / "up.pt")
''', args=[str(tmp_path), method])
    up = torch.load(tmp_path / "up.pt", weights_only=True)
    mine = ours.state_dict()
    assert sorted(up) == sorted(mine)
    for key, value in up.items():
        torch.testing.assert_close(mine[key], value, atol=2e-4, rtol=2e-3)


def test_eva_adapter_loads_in_upstream(tmp_path):
    model, data = _base(tmp_path)
    batches = [data[i:i + 10] for i in range(0, 40, 10)]
    config = LoraConfig(init_lora_weights="eva", target_modules=["lin0", "lin1"], r=2, lora_alpha=4,
                        eva_config=EvaConfig(rho=2.0))
    peft_model = get_peft_model(copy.deepcopy(model), config)
    initialize_lora_eva_weights(peft_model, batches, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    for module in peft_model.modules():
        if hasattr(module, "lora_B"):
            nn.init.normal_(module.lora_B["default"].weight)
    expected = peft_model(data).detach()
    peft_model.save_pretrained(tmp_path / "adapter")
    result = run_upstream(NET + '''
import sys
from pathlib import Path
from peft import PeftModel
d = Path(sys.argv[1])
model = Net().eval(); model.load_state_dict(torch.load(d / "base.pt"))
loaded = PeftModel.from_pretrained(model, d / "adapter")
torch.save(loaded(torch.load(d / "data.pt")).detach(), d / "up_out.pt")
emit({"ranks": {n: m.r["default"] for n, m in loaded.named_modules() if hasattr(m, "lora_A")}})
''', args=[str(tmp_path)])
    ranks = {n: m.r["default"] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert result.data["ranks"] == ranks
    torch.testing.assert_close(torch.load(tmp_path / "up_out.pt", weights_only=True), expected)
