"""LoraGAConfig: the official code's values are accepted, unknown ones rejected when the config is built, and the
upstream sub-config spelling reads whole saved configs."""

import json

import pytest

from peft import LoraConfig, LoraGAConfig, PeftConfig, PeftType
from peft.tuners.loraga.config import DTYPES, LoraGAInitOptions


def test_official_values_accepted():
    config = LoraGAConfig(target_modules=["q_proj"], init_lora_weights="lora_ga", dtype="bf16", scale="weightS")
    assert config.peft_type == PeftType.LORAGA and config.init_lora_weights is True
    assert set(DTYPES) == {"fp32", "fp64", "bf16", "fp16"}


@pytest.mark.parametrize(("field", "value"), [("dtype", "int8"), ("direction", "BrA2r"), ("scale", "gd_big"),
                                              ("iters", 0), ("bsz", True), ("max_length", "1024"),
                                              ("stable_gamma", -1)])
def test_unknown_values_rejected_at_build(field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}={value!r}: expected"):
        LoraGAConfig(target_modules=["q_proj"], **{field: value})


def test_round_trip_through_adapter_config(tmp_path):
    config = LoraGAConfig(target_modules=["q_proj"], r=4, iters=7, bsz=3, max_length=16, direction="ArBr",
                          scale="gd", stable_gamma=9, dtype="fp64")
    config.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAGA"
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, LoraGAConfig)
    assert (loaded.iters, loaded.bsz, loaded.max_length, loaded.direction, loaded.scale, loaded.stable_gamma,
            loaded.dtype) == (7, 3, 16, "ArBr", "gd", 9, "fp64")


def test_upstream_sub_config_forms():
    assert LoraGAInitOptions.from_any(None) == LoraGAInitOptions()
    options = LoraGAInitOptions.from_any({"direction": "A2rBr", "scale": "gd_scale", "stable_gamma": 4})
    assert (options.direction, options.scale, options.stable_gamma) == ("A2rBr", "gd", 4)
    # a whole LoraGAConfig given as lora_ga_config is saved as a dict of all its fields: it reads back
    saved = LoraGAConfig(direction="ArBr", scale="weight_svd").to_dict()
    assert LoraGAInitOptions.from_any(saved) == LoraGAInitOptions(direction="ArBr", scale="weightS")
    with pytest.raises(ValueError, match=r"Unknown lora_ga_config keys \['directon'\]"):
        LoraGAInitOptions.from_any({"directon": "ArBr"})
    with pytest.raises(ValueError, match="Invalid direction='up'"):
        LoraGAInitOptions.from_any({"direction": "up"})
    assert LoraConfig(init_lora_weights="lora_ga").peft_type == PeftType.LORA
