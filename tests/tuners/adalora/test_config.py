"""AdaLoraConfig: upstream's fields and defaults, validation, JSON round trip."""

import dataclasses
import json

import pytest

from peft import AdaLoraConfig, LoraConfig, PeftConfig
from peft.utils.peft_types import PeftType

UPSTREAM_DEFAULTS = dict(target_r=8, init_r=12, tinit=0, tfinal=0, deltaT=1, beta1=0.85, beta2=0.85,
                         orth_reg_weight=0.5, total_step=None, rank_pattern=None)


def test_fields_and_defaults_match_upstream():
    names = {f.name: f.default for f in dataclasses.fields(AdaLoraConfig)}
    for name, default in UPSTREAM_DEFAULTS.items():
        assert names[name] == default, name
    config = AdaLoraConfig(total_step=100)
    assert config.peft_type == PeftType.ADALORA
    assert isinstance(config, LoraConfig)  # upstream: AdaLoraConfig(LoraConfig), inherits its fields
    assert config.lora_alpha == 8 and config.lora_dropout == 0.0 and config.bias == "none"


def test_json_round_trip(tmp_path):
    config = AdaLoraConfig(total_step=50, tinit=5, tfinal=10, init_r=6, target_r=3, target_modules=["q", "v"],
                           rank_pattern={"a.q.lora_E": [True, False, True, True, False, False]})
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA" and data["rank_pattern"]["a.q.lora_E"][1] is False
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, AdaLoraConfig)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "total_step=None"),
    (dict(total_step=0), "total_step=0"),
    (dict(total_step=10, tinit=5, tfinal=5), "tinit=5, tfinal=5"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight=-1.0"),
    (dict(total_step=10, beta1=1.0), "beta1=1.0"),
    (dict(total_step=10, beta2=0.0), "beta2=0.0"),
    (dict(total_step=10, deltaT=0), "deltaT=0"),
    (dict(total_step=10, target_r=13), "target_r=13"),
    (dict(total_step=10, use_dora=True), "use_dora=True"),
    (dict(total_step=10, use_rslora=True), "use_rslora=True"),
    (dict(total_step=10, loftq_config={"loftq_bits": 4}), "loftq_config"),
    (dict(total_step=10, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(total_step=10, rank_pattern={"x.lora_E": [1, 2]}), r"rank_pattern\['x.lora_E'\]"),
])
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoraConfig(**kwargs)


def test_r_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="init_r"):
        config = AdaLoraConfig(total_step=10, r=16)
    assert config.init_r == 12
