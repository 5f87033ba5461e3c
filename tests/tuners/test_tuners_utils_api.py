"""Upstream's generic tuner helpers: target matching, target-list compression, model config, state-dict key
prefixes, the warnings for unused parts of a config, PeftWarning, and LoRA's dynamic dispatch."""

import dataclasses
import itertools
import json
import random
import warnings

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners import lora
from peft.tuners.target_matching import EXCLUDED, compress_target_modules, minimal_target_suffixes
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _find_minimal_target_modules,
    _get_tuner_state_dict_key_prefixes,
    check_target_module_exists,
)
from peft.utils import PeftWarning
from peft.utils.constants import DUMMY_MODEL_CONFIG, MIN_TARGET_MODULES_FOR_OPTIMIZATION


class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(6, 8, bias=bias)
        self.lin1 = nn.Linear(8, 3, bias=bias)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class Blocks(nn.Module):
    """`n` blocks under two lists whose names end alike: `blocks.i.query` and `single_blocks.i.query`."""

    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"query": nn.Linear(4, 4), "key": nn.Linear(4, 4)})
                                     for _ in range(n)])
        self.single_blocks = nn.ModuleList([nn.ModuleDict({"query": nn.Linear(4, 4)}) for _ in range(n)])

    def forward(self, x):
        for block in list(self.blocks) + list(self.single_blocks):
            x = sum(layer(x) for layer in block.values())
        return x


def _selected(names, keys):
    """Keys selected by a list of names under suffix matching."""
    return {k for k in keys if any(k == n or k.endswith("." + n) for n in names)}


# --- check_target_module_exists -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key, targets, layers, pattern, expected", [
    ("a.q_proj", ["q_proj"], None, None, True),
    ("a.xq_proj", ["q_proj"], None, None, False),
    ("q_proj", ".*_proj", None, None, True),
    ("m.layers.1.experts.0.up", ["up"], [1], None, True),  # the first index is the block, not the expert
    ("m.layers.1.experts.0.up", ["up"], [0], None, False),
    ("m.layers.1.experts.0.up", ["up"], [0], [r"\d+\.experts"], True),
    ("m.h.2.q", ["q"], [2], [], True),  # an empty layers_pattern means any block list
    ("m.h.2.q", ["q"], [2], ["layers"], False),
    ("layers.01.q", ["q"], 1, "layers", True),
])
def test_check_target_module_exists(key, targets, layers, pattern, expected):
    config = LoraConfig(target_modules=targets, layers_to_transform=layers, layers_pattern=pattern)
    assert bool(check_target_module_exists(config, key)) is expected


def test_check_target_module_exists_marks_exclusions():
    config = LoraConfig(target_modules=["lin0", "lin1"], exclude_modules=["lin0"], modules_to_save=["head"])
    assert check_target_module_exists(config, "lin0") is EXCLUDED and not EXCLUDED
    assert check_target_module_exists(config, "head.lin1") is EXCLUDED  # inside a modules_to_save module
    assert check_target_module_exists(config, "lin1") is True
    assert check_target_module_exists(LoraConfig(target_parameters=["lin0.weight"]), "lin0") is False


def test_empty_layers_pattern_is_accepted_and_set_one_still_needs_layers():
    assert LoraConfig(target_modules=["q"], layers_pattern=[]).layers_pattern == []
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(target_modules=["q"], layers_pattern=["layers"])


# --- minimal target suffixes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets, others, expected", [
    (["x.y"], [], {"y"}),
    (["1.w", "2.w"], ["3.w"], {"1.w", "2.w"}),
    (["a.b.c", "d.e.f"], ["a.b.x", "x.e.f"], {"c", "d.e.f"}),
    (["p.q.r", "s.q.r"], ["r.q.p"], {"r"}),
    (["ff.proj", "up.time_proj"], ["time_emb"], {"proj", "time_proj"}),  # "proj" must not hide "time_proj"
    (["b.c"], ["a.b.c"], {"b.c"}),  # a target that is a suffix of another name: nothing can be dropped
])
def test_minimal_target_suffixes(targets, others, expected):
    for t, o in itertools.product((targets, set(targets)), (others, set(others))):
        assert minimal_target_suffixes(t, o) == expected
    assert _find_minimal_target_modules is minimal_target_suffixes


def test_minimal_target_suffixes_select_the_same_modules():
    rng = random.Random(0)
    parts = ["a", "b", "c", "0", "1", "q", "k"]
    for _ in range(200):
        names = {".".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(12)}
        names = sorted(names)
        targets = set(rng.sample(names, rng.randint(1, len(names))))
        others = [n for n in names if n not in targets]
        result = minimal_target_suffixes(targets, others)
        assert _selected(result, names) == _selected(targets, names)
        assert len(result) <= len(targets)


@pytest.mark.parametrize("targets, others, match", [
    ([], ["a"], "list or set of strings"),
    ("a", ["b"], "list or set of strings"),
    (["", "a"], ["b"], "empty string"),
    (["a.b", "c"], ["a.b"], "common elements"),
])
def test_minimal_target_suffixes_bad_input(targets, others, match):
    with pytest.raises(ValueError, match=match):
        minimal_target_suffixes(targets, others)


def test_compress_target_modules_threshold_and_regex():
    keys = [f"blocks.{i}.query" for i in range(3)] + ["blocks.0.key"]
    assert compress_target_modules(keys[:3], keys, threshold=4) == keys[:3]  # too short: kept
    assert compress_target_modules(keys[:3], keys, threshold=3) == {"query"}
    assert compress_target_modules(".*query", keys, threshold=1) == ".*query"


def test_get_peft_model_compresses_long_target_lists_without_changing_the_model():
    n = MIN_TARGET_MODULES_FOR_OPTIMIZATION
    torch.manual_seed(0)
    base = Blocks(n)
    x = torch.randn(2, 4)
    long = [f"blocks.{i}.query" for i in range(n)] + [f"blocks.{i}.key" for i in range(n)]
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(target_modules=long, init_lora_weights=False))
    # "query" alone would also select single_blocks.i.query: the block list name has to stay
    assert model.peft_config["default"].target_modules == {"key"} | {f"blocks.{i}.query" for i in range(n)}
    assert sorted(model.targeted_module_names) == sorted(long)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.base_model.model.single_blocks.modules())
    out = model(x)
    torch.manual_seed(0)
    reference = get_peft_model(Blocks(n), LoraConfig(target_modules=long[:3], init_lora_weights=False))
    assert reference.peft_config["default"].target_modules == set(long[:3])  # below the threshold: as given
    torch.manual_seed(0)
    explicit = Blocks(n)
    torch.manual_seed(1)
    explicit = get_peft_model(explicit, LoraConfig(target_modules=sorted(long), init_lora_weights=False))
    torch.testing.assert_close(explicit(x), out)


# --- get_model_config ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _DataclassConfig:
    model_type: str = "toy"


class _ToDictConfig:
    def to_dict(self):
        return {"model_type": "toy"}


@pytest.mark.parametrize("config", [None, {"model_type": "toy"}, _DataclassConfig(), _ToDictConfig()])
def test_get_model_config(config):
    model = nn.Linear(2, 2)
    if config is not None:
        model.config = config
    expected = DUMMY_MODEL_CONFIG if config is None else {"model_type": "toy"}
    assert BaseTuner.get_model_config(model) == expected
    BaseTuner.get_model_config(model)["model_type"] = "changed"  # a copy: the constant stays
    assert DUMMY_MODEL_CONFIG == {"model_type": "custom"}


# --- state-dict key prefixes ---------------------------------------------------------------------------------------
def test_filter_state_dict_by_key_prefixes_respects_dots():
    sd = {"a": 0, "a.b": 1, "a.b.c": 2, "a.bc": 3, "x.a.b": 4}
    assert _filter_state_dict_by_key_prefixes(sd, {"a.b"}) == {"a.b": 1, "a.b.c": 2}
    assert _filter_state_dict_by_key_prefixes(sd, set()) == {}


def test_tuner_state_dict_key_prefixes_select_the_adapter_weights():
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"]))
    prefixes = _get_tuner_state_dict_key_prefixes(model)
    assert "base_model.model.lin0.lora_A" in prefixes
    assert not any("base_layer" in p or p.startswith("base_model.model.lin1") for p in prefixes)
    adapter_keys = {k for k in model.state_dict() if ".lora_" in k}
    assert set(_filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)) == adapter_keys
    narrowed = _get_tuner_state_dict_key_prefixes(model, adapter_name="other")
    assert "base_model.model.lin0.lora_A.other" in narrowed
    assert not any(p.endswith(".default") for p in narrowed)
    inner = _get_tuner_state_dict_key_prefixes(model.base_model.model)
    assert "lin0.lora_B" in inner


def test_tuner_state_dict_key_prefixes_ignore_base_modules_named_like_adapters():
    model = MLP()
    model.lora_extra = nn.Linear(3, 3)
    prefixes = _get_tuner_state_dict_key_prefixes(get_peft_model(model, LoraConfig(target_modules=["lin0"])))
    assert prefixes and not any("lora_extra" in p for p in prefixes)


# --- warnings and errors about what matched ------------------------------------------------------------------------
def test_unmatched_target_modules_warn_when_parameters_matched():
    with pytest.warns(RuntimeWarning, match=r"target_modules=\{'nope'\} were set but no module was matched"):
        model = get_peft_model(MLP(), LoraConfig(target_modules=["nope"], target_parameters=["lin0.weight"]))
    assert model.targeted_parameter_names == ["lin0.weight"]


def test_unused_exclude_modules_and_pattern_keys_warn():
    with pytest.warns(UserWarning, match="exclude_modules=.* but no modules were excluded"):
        get_peft_model(MLP(), LoraConfig(target_modules=["lin1"], exclude_modules=["nope"]))
    config = LoraConfig(target_modules=["lin0"], rank_pattern={"lin0": 2, "typo": 4}, alpha_pattern={"lin0": 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(MLP(), config)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ["rank_pattern keys that did not match any targeted module were ignored: ['typo']."]
    assert model.base_model.model.lin0.r["default"] == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin0", "lin1"]}, "All modules were excluded"),
    ({"target_modules": ["nope"]}, r"Target modules \['nope'\] not found in the base model"),
    ({"target_modules": ["lin0", "nope"], "exclude_modules": ["lin0"]}, "No modules were targeted for adaptation"),
])
def test_nothing_adapted_raises_and_leaves_the_model(kwargs, match):
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LoraConfig(**kwargs))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lora_bias_without_base_bias_is_a_peft_warning():
    assert issubclass(PeftWarning, UserWarning)
    with pytest.warns(PeftWarning, match="`lora_bias=True` was passed but the targeted layer of type Linear"):
        get_peft_model(MLP(bias=False), LoraConfig(target_modules=["lin0"], lora_bias=True))


# --- dynamic dispatch ----------------------------------------------------------------------------------------------
class MyModule(nn.Module):
    """Linear in behaviour, not an nn.Linear."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 6, 5
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


class MyLora(lora.Linear):
    pass


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(4, 6)
        self.mine = MyModule()

    def forward(self, x):
        return self.mine(torch.relu(self.lin0(x)))


def _custom_config(**kwargs):
    config = LoraConfig(target_modules=["lin0", "mine"], **kwargs)
    config._register_custom_module({MyModule: MyLora})
    return config


def test_custom_layer_class_is_used_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Unsupported layer type .*MyModule"):
        model = get_peft_model(CustomNet(), _custom_config(init_lora_weights=False))
    layer = model.base_model.model.mine
    assert type(layer) is MyLora and isinstance(layer.base_layer, MyModule)
    assert type(model.base_model.model.lin0) is lora.Linear
    x = torch.randn(3, 4)
    base_out = layer.base_layer(torch.relu(model.base_model.model.lin0.base_layer(x)))
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out)  # disabled == base
    # adapter output == merged output == output after save / load (with the class registered again)
    out = model(x)
    assert not torch.allclose(out, base_out)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "_custom_modules" not in saved
    torch.manual_seed(0)
    config = LoraConfig.from_pretrained(tmp_path)
    config._register_custom_module({MyModule: MyLora})
    loaded = PeftModel.from_pretrained(CustomNet(), tmp_path, config=config)
    assert type(loaded.base_model.model.mine) is MyLora
    torch.testing.assert_close(loaded(x), out)
    torch.testing.assert_close(model.merge_and_unload()(x), out, rtol=1e-5, atol=1e-6)


def test_custom_layer_class_overrides_built_in_linear_and_trains():
    config = LoraConfig(target_modules=["lin0", "lin1"])
    config._register_custom_module({nn.Linear: MyLora})
    model = get_peft_model(MLP(), config)
    assert type(model.base_model.model.lin0) is MyLora and type(model.base_model.model.lin1) is MyLora
    A = model.base_model.model.lin0.lora_A["default"].weight
    before = A.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(before, A.detach())


def test_custom_layer_without_in_out_features():
    class LstmLora(nn.Module, lora.LoraLayer):
        def __init__(self, base_layer, adapter_name, **kwargs):
            super().__init__()
            lora.LoraLayer.__init__(self, base_layer, **kwargs)
            self._active_adapter = adapter_name

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5)

    config = LoraConfig(target_modules=["lstm"])
    config._register_custom_module({nn.LSTM: LstmLora})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(Net(), config)
    assert isinstance(model.base_model.model.lstm, LstmLora)
    assert model.base_model.model.lstm.in_features is None
    assert "Unsupported layer type '<class 'torch.nn.modules.rnn.LSTM'>'" in str(caught[-1].message)


def test_register_custom_module_refuses_non_classes():
    config = LoraConfig(target_modules=["lin0"])
    with pytest.raises(ValueError, match="expected a module class mapped to a LoRA layer class"):
        config._register_custom_module({"Linear": MyLora})
    assert getattr(config, "_custom_modules", None) is None
