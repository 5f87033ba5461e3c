"""AdaLoraModel: orthogonality penalty in the loss, rank allocation during training, save / reload at the kept ranks."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer

F64 = torch.float64


class Regressor(nn.Module):
    """Three adapted layers; `dead` is multiplied by 0, so its adapter never gets a gradient."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.dead = nn.Linear(8, 4)

    def forward(self, x, labels=None):
        logits = self.b(torch.tanh(self.a(x))) + 0.0 * self.dead(x)
        loss = None if labels is None else ((logits - labels) ** 2).mean()
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _config(**kw):
    base = dict(total_step=60, tinit=5, tfinal=15, deltaT=5, init_r=6, target_r=2, lora_alpha=6,
                target_modules=["a", "b", "dead"])
    return AdaLoraConfig(**{**base, **kw})


def _data():
    torch.manual_seed(3)
    x = torch.randn(64, 8)
    return x, torch.sin(x[:, :4] * 2) + x[:, 4:]


def _layers(model):
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}


def test_orthogonality_penalty_added_to_loss():
    torch.manual_seed(0)
    model = get_peft_model(Regressor(), _config(orth_reg_weight=0.3))
    x, y = _data()
    with torch.no_grad():
        task = model.base_model.model.forward(x, labels=y).loss  # the wrapped model alone: no penalty
        loss = model(x, labels=y).loss
        norms = []
        for layer in _layers(model).values():
            a, b = layer.lora_A["default"], layer.lora_B["default"]
            norms += [torch.linalg.norm(a @ a.T - torch.eye(6)), torch.linalg.norm(b.T @ b - torch.eye(6))]
        expected = task + 0.3 * torch.stack(norms).mean()
        torch.testing.assert_close(loss, expected)
        assert model(x).loss is None
        with model.disable_adapter():
            torch.testing.assert_close(model(x, labels=y).loss, task)  # disabled: the base model's loss
    zero = get_peft_model(Regressor(), _config(orth_reg_weight=0.0))
    with torch.no_grad():
        torch.testing.assert_close(zero(x, labels=y).loss, zero.base_model.model.forward(x, labels=y).loss)


def _train(model, steps=60, lr=1e-2):
    x, y = _data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    task_losses, kept = [], []
    for step in range(steps):
        out = model(x, labels=y)
        out.loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        with torch.no_grad():
            task_losses.append(model.base_model.model.forward(x, labels=y).loss.item())
        kept.append({k: int((m.lora_E["default"] != 0).sum()) for k, m in _layers(model).items()})
    return task_losses, kept


def test_training_shrinks_budget_to_target_and_loss_goes_down():
    torch.manual_seed(0)
    model = get_peft_model(Regressor(), _config())
    allocator_budgets = []
    task_losses, kept = _train(model)
    allocator = model.base_model.rankallocator
    assert allocator.init_budget == 18 and allocator.target_budget == 6
    for step in range(60):
        allocator_budgets.append(allocator.budget_schedule(step)[0])
    # before tinit nothing is masked: E moves away from 0 everywhere
    assert sum(kept[4].values()) == 12  # 'dead' has E = 0 exactly (no gradient), the others all 6 triplets
    # at masking steps the total kept never exceeds the schedule's budget
    for step in range(10, 45, 5):
        assert sum(kept[step].values()) <= allocator_budgets[step]
    # from total_step - tfinal = 45 on: the final budget, fixed
    pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(mask) for mask in pattern.values()) == 6
    assert set(pattern) == {"a.lora_E.default", "b.lora_E.default", "dead.lora_E.default"}
    assert sum(pattern["dead.lora_E.default"]) == 0  # no gradient -> zero importance -> pruned first
    for step in range(45, 60):
        assert kept[step] == kept[45]
    assert task_losses[-1] < 0.5 * task_losses[0]


def test_saved_after_allocation_reloads_at_kept_ranks(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Regressor(), _config())
    _train(model)
    x, _ = _data()
    with torch.no_grad():
        trained = model(x).logits
    live_pattern = dict(model.peft_config["default"].rank_pattern)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["rank_pattern"]) == {"a.lora_E", "b.lora_E", "dead.lora_E"}
    assert model.peft_config["default"].rank_pattern == live_pattern  # the live config is not changed
    weights = load_file(tmp_path / "adapter_model.safetensors")
    ranks = {k: sum(v) for k, v in live_pattern.items()}
    assert weights["base_model.model.a.lora_A"].shape == (ranks["a.lora_E.default"], 8)
    assert weights["base_model.model.b.lora_B"].shape == (4, ranks["b.lora_E.default"])
    assert weights["base_model.model.dead.lora_E"].shape == (0, 1)
    assert not any("ranknum" in k for k in weights)

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Regressor(), tmp_path)
    layers = _layers(loaded)
    assert layers["a"].lora_A["default"].shape[0] == ranks["a.lora_E.default"]
    assert layers["a"].ranknum["default"].item() == 6  # the scale keeps the initial rank
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, trained)

    torch.manual_seed(0)
    lazy = PeftModel.from_pretrained(Regressor(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in lazy.parameters())
    with torch.no_grad():
        torch.testing.assert_close(lazy(x).logits, trained)


def test_one_trainable_adapter_only():
    model = get_peft_model(Regressor(), _config())
    before = {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        model.add_adapter("other", _config())
    assert {n for n, _ in model.named_parameters()} == before and "other" not in model.peft_config
    model.add_adapter("frozen", _config(inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"


def test_update_and_allocate_needs_a_trainable_adapter(tmp_path):
    model = get_peft_model(Regressor(), _config())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(Regressor(), tmp_path)  # inference mode
    with pytest.raises(ValueError, match="trainable AdaLoRA adapter"):
        loaded.base_model.update_and_allocate(0)


def test_default_targets_for_bert():
    from tests.helpers.tiny_models import tiny_bert_classifier

    model = get_peft_model(tiny_bert_classifier(), AdaLoraConfig(total_step=10, task_type="SEQ_CLS"))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}
    assert adapted == {"query", "value"}


def test_load_adapter_with_rank_pattern_into_existing_full_rank_adapter(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Regressor(), _config())
    _train(model)
    x, _ = _data()
    with torch.no_grad():
        trained = model(x).logits
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = get_peft_model(Regressor(), _config())  # layers at init_r, no rank pattern
    fresh.load_adapter(tmp_path, "default")
    assert _layers(fresh)["a"].lora_A["default"].shape[0] == 6
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, trained)
    assert fresh.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
