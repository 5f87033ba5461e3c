"""Behaviour that follows upstream PEFT 0.21.2 where the fork used to differ (issue 15, item 6 and item 4):
adapter enable state around `disable_adapter()`, per-adapter state on deletion, layer indices on MoE paths,
`modules_to_save` on containers, task heads, adapter dtypes, `low_cpu_mem_usage`, the model card, and the base model
state dict."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from peft import (
    LoraConfig,
    PeftModel,
    PeftModelForSequenceClassification,
    get_base_model_state_dict,
    get_peft_model,
    inject_adapter_in_model,
    set_base_model_state_dict,
)
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.target_matching import layer_index


class MLP(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.lin0 = nn.Linear(8, 16, dtype=dtype)
        self.lin1 = nn.Linear(16, 16, dtype=dtype)
        self.head = nn.Linear(16, 3, dtype=dtype)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MLP(dtype)


def _config(**kwargs):
    kwargs.setdefault("target_modules", ["lin0", "lin1"])
    kwargs.setdefault("r", 4)
    return LoraConfig(init_lora_weights=False, **kwargs)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


# --- disable_adapter ------------------------------------------------------------------------------------------------
def test_disable_adapter_restores_the_previous_state():
    model = get_peft_model(_model(), _config())
    base = model.get_base_model()
    with torch.no_grad():
        adapted = model(X)
        with model.disable_adapter():
            assert not model.has_active_enabled_adapter
            with model.disable_adapter():  # nested: the inner exit must not switch the adapters back on
                pass
            assert all(m.disable_adapters for m in _layers(base))
            disabled = model(X)
        assert torch.equal(model(X), adapted)
    assert model.has_active_enabled_adapter
    model.base_model.disable_adapter_layers()  # disabled before the context: still disabled after it
    with model.disable_adapter():
        pass
    assert all(m.disable_adapters for m in _layers(base))
    with torch.no_grad():
        assert torch.equal(model(X), disabled)
        assert not torch.allclose(adapted, disabled)


def test_disable_adapter_with_mixed_layer_states_warns_and_enables_all():
    model = get_peft_model(_model(), _config())
    _layers(model)[0].enable_adapters(False)
    with pytest.warns(UserWarning, match="some adapter layers that are enabled and others that are disabled"):
        with model.disable_adapter():
            pass
    assert not any(m.disable_adapters for m in _layers(model))


# --- delete_adapter -------------------------------------------------------------------------------------------------
def test_delete_adapter_removes_every_per_adapter_entry():
    model = get_peft_model(_model(), _config(use_rslora=True), adapter_name="a")
    model.add_adapter("b", _config())
    model.delete_adapter("a")
    for layer in _layers(model):
        for value in vars(layer).values():
            if isinstance(value, dict):
                assert "a" not in value
        assert "a" not in layer.use_rslora and "b" in layer.use_rslora
    with pytest.raises(ValueError, match="Adapter a does not exist"):
        model.delete_adapter("a")


def test_deleting_a_merged_adapter_is_refused_without_change():
    model = get_peft_model(_model(), _config())
    model.merge_adapter()
    with torch.no_grad():
        merged = model(X)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        model.delete_adapter("default")
    assert "default" in model.peft_config and all(m.merged_adapters == ["default"] for m in _layers(model))
    with torch.no_grad():
        assert torch.equal(model(X), merged)
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert not model.peft_config


# --- layers_to_transform on MoE paths -------------------------------------------------------------------------------
class MoE(nn.Module):
    """`model.layers.<i>.experts.<j>.w1`, the shape of a transformers MoE model's expert paths."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(4, 4)}) for _ in range(3))})
            for _ in range(3)
        )

    def forward(self, x):
        for block in self.model.layers:
            x = sum(expert["w1"](x) for expert in block["experts"])
        return x


def test_layer_index_reads_the_block_index_not_the_expert_index():
    assert layer_index("model.layers.1.mlp.experts.0.w1", None) == 1
    assert layer_index("layers.2.experts.0.w1", "layers") == 2  # a pattern may start the key
    assert layer_index("model.h.3.attn", ["layers", "h"]) == 3
    model = get_peft_model(MoE(), LoraConfig(target_modules=["w1"], layers_to_transform=[1]))
    adapted = sorted(k for k, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer))
    assert adapted == [f"model.layers.1.experts.{j}.w1" for j in range(3)]


# --- modules_to_save on containers, task heads ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "container",
    [
        lambda: nn.ModuleDict({"a": nn.Linear(2, 2)}),
        lambda: nn.ModuleList([nn.Linear(2, 2)]),
        lambda: nn.ParameterDict({"a": nn.Parameter(torch.ones(2))}),
        lambda: nn.ParameterList([nn.Parameter(torch.ones(2))]),
    ],
)
def test_modules_to_save_refuses_containers_and_leaves_the_model_unchanged(container):
    model = _model()
    model.box = container()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type"):
        get_peft_model(model, _config(modules_to_save=["box"]))
    assert not _layers(model) and not hasattr(model, "peft_config")
    assert model.state_dict().keys() == before.keys()


def test_sequence_classification_class_accepts_a_model_without_a_head():
    model = PeftModelForSequenceClassification(_model(), _config())
    assert model.peft_config["default"].modules_to_save is None
    with_head = _model()
    with_head.classifier = nn.Linear(3, 2)
    model = PeftModelForSequenceClassification(with_head, _config())
    assert model.peft_config["default"].modules_to_save == ["classifier"]


# --- adapter dtype and low_cpu_mem_usage ----------------------------------------------------------------------------
def _adapter_dtypes(model):
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("autocast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_on_every_entry_point(tmp_path, autocast, expected):
    model = get_peft_model(_model(torch.bfloat16), _config(), autocast_adapter_dtype=autocast)
    model.add_adapter("other", _config(), autocast_adapter_dtype=autocast)
    assert _adapter_dtypes(model) == {expected}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(torch.bfloat16), tmp_path, autocast_adapter_dtype=autocast)
    loaded.load_adapter(tmp_path / "other", "other", autocast_adapter_dtype=autocast)
    assert _adapter_dtypes(loaded) == {expected}


def test_low_cpu_mem_usage_creates_on_meta_and_loads_real_weights(tmp_path):
    model = get_peft_model(_model(), _config())
    model.add_adapter("other", _config(r=2))
    with torch.no_grad():
        expected = model(X)
    model.save_pretrained(tmp_path)

    injected = inject_adapter_in_model(_config(), _model(), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in injected.named_parameters() if "lora_" in n} == {"meta"}
    assert {p.device.type for n, p in injected.named_parameters() if "lora_" not in n} == {"cpu"}

    loaded = PeftModel.from_pretrained(_model(), tmp_path, low_cpu_mem_usage=True)
    loaded.load_adapter(tmp_path / "other", "other", low_cpu_mem_usage=True)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.allclose(loaded(X), expected)
        state = model.state_dict()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, state[key]), key

    loaded.add_adapter("empty", _config(), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in loaded.named_parameters() if ".empty." in n} == {"meta"}


# --- model card -----------------------------------------------------------------------------------------------------
def test_save_pretrained_writes_a_model_card_and_keeps_the_users_text(tmp_path):
    import yaml

    model = get_peft_model(_model(), _config())
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and "base_model" not in meta

    user = "---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nTrained on my data.\n"
    (tmp_path / "README.md").write_text(user, encoding="utf-8")
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: nothing is added twice
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "mit" and meta["library_name"] == "peft"
    assert {"mine", "lora"} <= set(meta["tags"])
    assert "# My adapter" in text and "Trained on my data." in text
    assert text.count("- PEFT ") == 1
    assert os.path.exists(tmp_path / "adapter_model.safetensors")


# --- base model state dict ------------------------------------------------------------------------------------------
def test_base_model_state_dict_round_trip():
    plain = _model()
    original = {k: v.clone() for k, v in plain.state_dict().items()}
    model = get_peft_model(plain, _config(modules_to_save=["head"]))
    extracted = get_base_model_state_dict(model)
    assert extracted.keys() == original.keys()
    assert all(torch.equal(extracted[k], original[k]) for k in original)
    lora = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    with torch.no_grad():
        for param in model.get_base_model().parameters():
            param.add_(1.0)
    result = set_base_model_state_dict(model, original)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(get_base_model_state_dict(model)[k], original[k]) for k in original)
    state = model.state_dict()  # adapter weights were not touched by the load (they moved with add_(1.0) only)
    assert all(torch.equal(state[k], v + 1.0) for k, v in lora.items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        set_base_model_state_dict(model, {**original, "nope.weight": torch.zeros(1)})
