"""Adapter state dicts in upstream's on-disk format, and the save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.save_and_load import load_peft_weights
from tests.helpers.lora_checks import randomize_adapter, trainable_names
from tests.helpers.tiny_models import TINY_MODELS, model_output, tiny_gpt2

SPEC = TINY_MODELS["custom"]


def _custom(adapter_name: str = "default", **config):
    kwargs = dict(r=2, target_modules=["emb", "conv", "lin1"], modules_to_save=["lin2"])
    kwargs.update(config)
    model = get_peft_model(SPEC.build(), LoraConfig(**kwargs), adapter_name=adapter_name)
    randomize_adapter(model, adapter_name, seed=1)
    return model


def test_state_dict_keys_and_shapes_follow_upstream():
    state = get_peft_model_state_dict(_custom())
    prefix = "base_model.model."
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        prefix + "emb.lora_embedding_A": (2, 64),
        prefix + "emb.lora_embedding_B": (8, 2),
        prefix + "conv.lora_A.weight": (2, 8, 3, 3),
        prefix + "conv.lora_B.weight": (6, 2, 1, 1),
        prefix + "lin1.lora_A.weight": (2, 96),
        prefix + "lin1.lora_B.weight": (16, 2),
        prefix + "lin2.weight": (5, 16),
        prefix + "lin2.bias": (5,),
    }


def test_conv1d_shapes_are_r_by_in_and_out_by_r():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    state = get_peft_model_state_dict(model)
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 16)
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 4)


def test_adapter_name_is_not_in_the_keys_and_weights_move_between_names():
    model = _custom("my_adapter")
    state = get_peft_model_state_dict(model, adapter_name="my_adapter")
    assert state and not any("my_adapter" in k for k in state)
    other = _custom("elsewhere")
    set_peft_model_state_dict(other, state, adapter_name="elsewhere")
    torch.testing.assert_close(model_output(other(**SPEC.inputs())), model_output(model(**SPEC.inputs())),
                               atol=0, rtol=0)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_entries(bias):
    state = get_peft_model_state_dict(_custom(bias=bias, modules_to_save=None))
    biases = {k.removeprefix("base_model.model.") for k in state if k.endswith("bias")}
    assert biases == {"none": set(), "lora_only": {"conv.base_layer.bias", "lin1.base_layer.bias"},
                      "all": {"conv.base_layer.bias", "lin1.base_layer.bias", "lin2.bias"}}[bias]


def test_set_state_dict_checks_everything_before_copying():
    model = _custom()
    state = get_peft_model_state_dict(model)
    target = _custom()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    bad_shape = dict(state)
    bad_shape["base_model.model.lin1.lora_A.weight"] = torch.zeros(3, 96)
    missing = {k: v for k, v in state.items() if "conv" not in k}
    unexpected = dict(state, **{"base_model.model.nothing.lora_A.weight": torch.zeros(1)})
    for broken, message in ((bad_shape, "Shape mismatch.*lin1"), (missing, "missing keys.*conv"),
                            (unexpected, "unexpected keys.*nothing")):
        with pytest.raises(ValueError, match=message):
            set_peft_model_state_dict(target, broken)
        for k, v in target.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a failed load"


def test_ignore_mismatched_sizes_skips_only_those_tensors():
    state = get_peft_model_state_dict(_custom())
    target = _custom()
    old = target.get_base_model().lin1.lora_A["default"].weight.detach().clone()
    state["base_model.model.lin1.lora_A.weight"] = torch.zeros(3, 96)
    with pytest.warns(UserWarning, match="lin1.lora_A.weight"):
        set_peft_model_state_dict(target, state, ignore_mismatched_sizes=True)
    assert torch.equal(target.get_base_model().lin1.lora_A["default"].weight, old)
    assert torch.equal(target.get_base_model().conv.lora_A["default"].weight,
                       state["base_model.model.conv.lora_A.weight"])


def test_set_state_dict_casts_dtype():
    state = {k: v.double() for k, v in get_peft_model_state_dict(_custom()).items()}
    target = _custom()
    set_peft_model_state_dict(target, state)
    assert target.get_base_model().lin1.lora_A["default"].weight.dtype == torch.float32


def test_saved_files(tmp_path):
    model = _custom()
    model.peft_config["default"].base_model_name_or_path = "tiny/custom"
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert metadata["format"] == "pt" and set(metadata) == {"format", "peft_config_sha256"}
        assert set(f.keys()) == set(get_peft_model_state_dict(model))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["base_model_name_or_path"] == "tiny/custom"
    assert model.peft_config["default"].inference_mode is False, "saving does not change the live config"


def test_trainer_style_state_dict_argument(tmp_path):
    model = _custom()
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b", state_dict=model.state_dict())
    a, b = load_peft_weights(tmp_path / "a"), load_peft_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_main_process_writes_nothing(tmp_path):
    _custom().save_pretrained(tmp_path / "x", is_main_process=False)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_safetensors_preferred_over_bin(tmp_path):
    first, second = _custom(), _custom()
    randomize_adapter(second, seed=5)
    first.save_pretrained(tmp_path)
    torch.save(get_peft_model_state_dict(second), tmp_path / "adapter_model.bin")  # a save removes it, so by hand
    loaded = load_peft_weights(tmp_path)
    expected = get_peft_model_state_dict(first)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_load_adapter_replaces_existing_weights_and_freezes_when_not_trainable(tmp_path):
    trained = _custom()
    trained.save_pretrained(tmp_path)
    model = _custom()
    randomize_adapter(model, seed=9)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["lin1"]))
    model.load_adapter(tmp_path, "default", is_trainable=True)
    torch.testing.assert_close(model_output(model(**SPEC.inputs())), model_output(trained(**SPEC.inputs())),
                               atol=0, rtol=0)
    assert any(".default" in n for n in trainable_names(model))
    model.load_adapter(tmp_path, "third", is_trainable=False)
    assert not any(".third" in n for n in trainable_names(model))
    assert any(".default" in n for n in trainable_names(model)), "freezing one adapter leaves the others"


def test_from_pretrained_trainable_round_trip_keeps_training_flags(tmp_path):
    model = _custom()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(SPEC.build(), tmp_path, is_trainable=True)
    assert trainable_names(loaded) == trainable_names(model)
    assert loaded.peft_config["default"].inference_mode is False


def test_same_adapter_saved_in_two_processes_gives_the_same_bytes(tmp_path):
    """safetensors writes metadata keys in hash-map order (random per process); the save sorts them."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from peft.utils.save_and_load import save_adapter_weights\n"
        "tensors = {'m.lora_A.weight': torch.arange(6.0).reshape(2, 3), 'm.lora_B.weight': torch.ones(3, 2)}\n"
        "save_adapter_weights(tensors, sys.argv[1], config_record='0123abcd')\n"
    )
    outputs = []
    for i in range(6):  # key order is random per process: 6 equal saves by chance has probability 1/32
        folder = tmp_path / str(i)
        folder.mkdir()
        subprocess.run([sys.executable, "-c", script, str(folder)], check=True)
        outputs.append((folder / "adapter_model.safetensors").read_bytes())
    assert all(o == outputs[0] for o in outputs)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "peft_config_sha256": "0123abcd"}


def test_a_save_clears_the_readme_temporary_a_killed_save_left(tmp_path):
    """A save killed while writing the model card leaves `.README.md.<random>.tmp`; the next save removes it (as it
    removes the weights' and config's), so a folder never keeps collecting them."""
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".README.md.abc123.tmp").write_text("half a card")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    assert (tmp_path / "README.md").read_text().startswith("---")
