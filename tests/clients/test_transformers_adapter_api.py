"""transformers' own adapter API (`PeftAdapterMixin`: add_adapter, load_adapter, from_pretrained(adapter_dir),
set/disable/enable/delete_adapter, hotswap) and the Trainer on such a model, against this package."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tests.helpers.tiny_models import tiny_llama

IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _saved_base(tmp_path):
    path = str(tmp_path / "base")
    tiny_llama().save_pretrained(path)
    return path


def _trained_adapter(tmp_path, base_path, name="adapter", targets=("q_proj", "v_proj"), r=4, seed=1):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False))
    model.eval()
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path, _logits(model)


def _peft_imports(module) -> list[tuple[str, str]]:
    """(module, name) for every `from peft... import name` in a module's source."""
    tree = ast.parse(inspect.getsource(module))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peft"
            for alias in node.names]


def test_every_peft_import_of_transformers_integration_resolves():
    import transformers.distributed.fsdp as fsdp
    import transformers.integrations.peft as integration

    imports = _peft_imports(integration) + _peft_imports(fsdp)
    assert len(imports) >= 8
    missing = [f"{mod}.{name}" for mod, name in imports if not hasattr(importlib.import_module(mod), name)]
    assert missing == []


def test_version_passes_transformers_check_and_the_surface_is_there():
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils import check_peft_version

    check_peft_version(min_version=MIN_PEFT_VERSION)
    from peft.functional import delete_adapter
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    from peft.utils.transformers_weight_conversion import build_peft_weight_mapping

    assert issubclass(ModulesToSaveWrapper, AuxiliaryTrainingWrapper)
    assert callable(delete_adapter) and callable(build_peft_weight_mapping)


def test_load_adapter_and_from_pretrained_adapter_dir_equal_peft_model(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base = _saved_base(tmp_path)
    adapter, expected = _trained_adapter(tmp_path, base)
    model = LlamaForCausalLM.from_pretrained(base)
    info = model.load_adapter(adapter)
    assert not info.missing_keys and not info.unexpected_keys
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # inference by default

    direct = AutoModelForCausalLM.from_pretrained(adapter)  # adapter_config.json names the base folder
    torch.testing.assert_close(_logits(direct), expected, rtol=0, atol=1e-6)

    trainable = LlamaForCausalLM.from_pretrained(base)
    trainable.load_adapter(adapter, is_trainable=True)
    assert all(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_add_set_disable_enable_delete_adapter(tmp_path):
    from transformers import LlamaForCausalLM

    base = _saved_base(tmp_path)
    adapter, expected = _trained_adapter(tmp_path, base)
    model = LlamaForCausalLM.from_pretrained(base)
    reference = _logits(model)
    model.load_adapter(adapter, adapter_name="one")
    model.add_adapter(LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), adapter_name="two")
    assert model.active_adapters() == ["two"]
    assert set(model.peft_config) == {"one", "two"}
    state = model.get_adapter_state_dict("two")
    assert state and all("k_proj" in k and "lora_" in k for k in state)

    model.set_adapter("one")
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    model.disable_adapters()
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)

    model.delete_adapter("two")
    assert set(model.peft_config) == {"one"}
    assert not any(n.endswith(".two.weight") for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    model.delete_adapter("one")
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())  # the plain model again
    assert not model._hf_peft_config_loaded
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=0)


def test_transformers_save_pretrained_loads_in_peft_model(tmp_path):
    from transformers import LlamaForCausalLM

    base = _saved_base(tmp_path)
    model = LlamaForCausalLM.from_pretrained(base)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "tf-saved"))
    assert json.loads((tmp_path / "tf-saved" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(tmp_path / "tf-saved"))
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)


def test_hotswap_replaces_weights_in_place(tmp_path):
    from transformers import LlamaForCausalLM

    base = _saved_base(tmp_path)
    first, _ = _trained_adapter(tmp_path, base, name="first", seed=1)
    second, expected = _trained_adapter(tmp_path, base, name="second", seed=2)
    model = LlamaForCausalLM.from_pretrained(base)
    model.load_adapter(first, adapter_name="default")
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    model.load_adapter(second, adapter_name="default", hotswap=True)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    assert [m for m in model.modules() if isinstance(m, BaseTunerLayer)] == layers  # no new injection
    assert list(model.peft_config) == ["default"]


def test_trainer_trains_only_the_added_adapter(tmp_path):
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    model = LlamaForCausalLM.from_pretrained(_saved_base(tmp_path))
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    data = [{"input_ids": IDS[0], "labels": IDS[0]} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=data).train()
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)


# --- transformers v5 renamed modules ---------------------------------------------------------------------------

def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4, num_labels=3)
    return ViTForImageClassification(config).eval()


# What transformers 4 called ViT's modules (written out here, independently of the conversion code under test).
_V4_NAMES = {"vit.layers.": "vit.encoder.layer.", "attention.q_proj": "attention.attention.query",
             "attention.v_proj": "attention.attention.value", "mlp.fc1": "intermediate.dense"}


def _v4_adapter(tmp_path, config: LoraConfig, v4_targets: list[str]):
    """An adapter in the layout transformers 4 models had: keys and target_modules under the old names."""
    torch.manual_seed(5)
    model = get_peft_model(_tiny_vit(), config).eval()
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    path = tmp_path / "v4-adapter"
    model.save_pretrained(str(path))
    weights = load_file(str(path / "adapter_model.safetensors"))
    renamed = {}
    for key, value in weights.items():
        for new, old in _V4_NAMES.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert any(".encoder.layer." in k and ".attention.attention.query.lora_A" in k for k in renamed)
    save_file(renamed, str(path / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_modules"] = v4_targets
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return str(path), pixels, expected


@pytest.mark.parametrize("layers", [None, [1]])
def test_adapter_with_transformers_v4_names_loads_on_v5_model(tmp_path, layers):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "fc1"], layers_to_transform=layers,
                        layers_pattern=None if layers is None else "layers", init_lora_weights=False)
    v4_config_layers_pattern = None if layers is None else "layer"
    path, pixels, expected = _v4_adapter(tmp_path, config, ["query", "value", "intermediate.dense"])
    if layers is not None:
        cfg = json.loads(open(os.path.join(path, "adapter_config.json")).read())
        cfg["layers_pattern"] = v4_config_layers_pattern
        open(os.path.join(path, "adapter_config.json"), "w").write(json.dumps(cfg))

    peft_model = PeftModel.from_pretrained(_tiny_vit(), path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(pixel_values=pixels).logits, expected, rtol=0, atol=1e-6)
    n_layers = len([m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)])
    assert n_layers == (6 if layers is None else 3)

    model = _tiny_vit()
    info = model.load_adapter(path)
    assert not info.missing_keys and not info.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, rtol=0, atol=1e-6)


def test_adapter_keys_matching_nothing_after_conversion_is_an_error_model_unchanged(tmp_path):
    path, pixels, _ = _v4_adapter(tmp_path, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                                  ["query"])
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    weights = {k.replace("attention.attention.query", "attention.attention.nowhere"): v for k, v in weights.items()}
    save_file(weights, os.path.join(path, "adapter_model.safetensors"))
    model = _tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="nowhere"):
        PeftModel.from_pretrained(model, path)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_build_peft_weight_mapping_renames_file_keys_to_model_keys():
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key

    from peft.utils.transformers_weight_conversion import build_peft_weight_mapping

    model = _tiny_vit()
    mapping = build_peft_weight_mapping(get_model_conversion_mapping(model), "ad", LoraConfig())
    renamings = [m for m in mapping if type(m).__name__ in ("WeightRenaming", "PrefixChange", "GroupWeightRename")]
    cases = {
        "base_model.model.vit.encoder.layer.1.attention.attention.query.lora_A.weight":
            "vit.layers.1.attention.q_proj.lora_A.ad.weight",
        "base_model.model.vit.layers.0.attention.v_proj.lora_B.weight":
            "vit.layers.0.attention.v_proj.lora_B.ad.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A": "model.embed_tokens.lora_embedding_A.ad",
    }
    for file_key, model_key in cases.items():
        assert rename_source_key(file_key, renamings, [])[0] == model_key


def test_fsdp_auto_wrap_policy_wraps_blocks_and_trainable_leaves(tmp_path):
    from peft.utils.other import fsdp_auto_wrap_policy

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    policy = fsdp_auto_wrap_policy(model.get_base_model())
    block = model.get_base_model().model.layers[0]
    lora_a = block.self_attn.q_proj.lora_A["default"]
    assert policy(module=block, recurse=False, nonwrapped_numel=10**6)
    assert policy(module=lora_a, recurse=False, nonwrapped_numel=10**6)
    assert not policy(module=block.mlp.up_proj, recurse=False, nonwrapped_numel=10**6)  # frozen leaf
    assert isinstance(lora_a, nn.Linear)


def test_adapter_on_experts_that_transformers_fuses_is_refused_model_unchanged(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=2))
    LoraConfig(r=2, target_modules=["q_proj", "w1"]).save_pretrained(str(tmp_path))
    layer = "base_model.model.model.layers.0"
    weights = {f"{layer}.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16),
               f"{layer}.self_attn.q_proj.lora_B.weight": torch.zeros(16, 2),
               f"{layer}.block_sparse_moe.experts.0.w1.lora_A.weight": torch.zeros(2, 16),  # transformers 4 layout
               f"{layer}.block_sparse_moe.experts.0.w1.lora_B.weight": torch.zeros(32, 2)}
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="experts.0.w1.*fuses into.*gate_up_proj"):
        PeftModel.from_pretrained(model, str(tmp_path))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
