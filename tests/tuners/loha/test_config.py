"""LoHaConfig / LoKrConfig: upstream's fields and defaults, validation of bad values, JSON round trip."""

from __future__ import annotations

import json

import pytest

from peft import LoHaConfig, LoKrConfig, PeftConfig, PeftType

OWN_EXTRAS = {"peft_version"}  # set by whoever writes the config


@pytest.mark.upstream
def test_fields_and_defaults_match_upstream():
    from tests.upstream_harness import run_upstream

    result = run_upstream('''
import dataclasses
from peft import LoHaConfig, LoKrConfig
emit({c.__name__: {f.name: getattr(c(), f.name) for f in dataclasses.fields(c)} for c in (LoHaConfig, LoKrConfig)})
''')
    for cls in (LoHaConfig, LoKrConfig):
        theirs = result.data[cls.__name__]
        ours = json.loads(json.dumps(cls().to_dict()))
        assert set(theirs) - OWN_EXTRAS == set(ours) - OWN_EXTRAS
        for key in set(theirs) - OWN_EXTRAS - {"peft_type"}:
            assert ours[key] == theirs[key], key
        assert ours["peft_type"] == cls.peft_type_default.value


@pytest.mark.parametrize("cls", [LoHaConfig, LoKrConfig])
@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", 1.5), ("alpha", -1), ("rank_dropout", 1.5), ("module_dropout", -0.1),
    ("use_effective_conv2d", "yes"), ("init_weights", "gaussian"), ("rank_pattern", {"q": 0}),
    ("target_modules", 3), ("layers_to_transform", -1),
])
def test_bad_values_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        cls(**{field: value})


@pytest.mark.parametrize("field,value", [("decompose_factor", 0), ("decompose_factor", -2),
                                         ("decompose_both", 1), ("rank_dropout_scale", "no")])
def test_lokr_bad_values(field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        LoKrConfig(**{field: value})


def test_layers_pattern_needs_layers_to_transform():
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoHaConfig(target_modules=["q"], layers_pattern="layers")


@pytest.mark.parametrize("cls,extra", [(LoHaConfig, {"use_effective_conv2d": True}),
                                       (LoKrConfig, {"init_weights": "lycoris", "decompose_factor": 4})])
def test_json_round_trip(cls, extra, tmp_path):
    config = cls(r=4, alpha=2.5, target_modules=["a", "b"], rank_pattern={"a": 2}, **extra)
    config.save_pretrained(str(tmp_path))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is cls and loaded.peft_type == cls.peft_type_default
    assert loaded.to_dict() == config.to_dict()
    assert loaded.target_modules == {"a", "b"}
    assert cls.peft_type_default in (PeftType.LOHA, PeftType.LOKR)
