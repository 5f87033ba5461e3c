"""VeRA details upstream's own tests rely on: shared projection tensors, layer access to them, persistence of an
edited projection, dropout without a submodule (so a regex target cannot reach into a VeRA layer)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peft import PeftModel, VeraConfig, get_peft_model

from ._nets import TARGETS, build_net, inputs


def _vera(**kw):
    return get_peft_model(build_net(), VeraConfig(**{"r": 4, "target_modules": TARGETS, "init_weights": False, **kw}))


def test_same_key_adapters_share_projection_tensors_and_layers_see_them():
    model = _vera()
    model.add_adapter("other", VeraConfig(r=4, target_modules=TARGETS, init_weights=False))
    tuner = model.base_model
    assert tuner.vera_A["default"] is tuner.vera_A["other"] and tuner.vera_B["default"] is tuner.vera_B["other"]
    for name in TARGETS:
        layer = getattr(tuner.model, name)
        assert layer.vera_A is tuner.vera_A and layer.vera_B is tuner.vera_B
        assert "vera_A" not in dict(layer.named_modules())  # a reference, not a submodule of the layer
    x = inputs()
    model.set_adapter("default")
    out_default = model(x)
    model.set_adapter("other")
    assert (model(x) - out_default).abs().max() > 1e-4  # own lambdas
    model.delete_adapter("other")
    assert "other" not in tuner.vera_A and tuner.vera_A["default"].shape == (4, 20)


def test_other_key_or_size_draws_own_projections():
    model = _vera()
    model.add_adapter("key9", VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=9))
    model.add_adapter("small", VeraConfig(r=2, target_modules=["lin1"]))
    tuner = model.base_model
    assert not torch.equal(tuner.vera_A["key9"], tuner.vera_A["default"])
    assert tuner.vera_A["small"].shape == (2, 20) and tuner.vera_B["small"].shape == (12, 2)


def test_projection_edited_in_place_is_still_saved_and_restored(tmp_path):
    model = _vera(save_projection=True)
    with torch.no_grad():
        model.base_model.vera_A["default"] += 1.0  # BufferDict.__setitem__ again: must stay persistent
        model.base_model.vera_B["default"] += 1.0
    x = inputs()
    out = model(x)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    loaded = PeftModel.from_pretrained(build_net(), tmp_path)
    torch.testing.assert_close(loaded.base_model.vera_A["default"], model.base_model.vera_A["default"])
    torch.testing.assert_close(loaded(x), out)


def test_not_saved_projection_stays_out_of_the_state_dict_after_an_edit():
    model = _vera(save_projection=False)
    with torch.no_grad():
        model.base_model.vera_A["default"] += 0.0
    assert not any("vera_A" in k for k in model.state_dict())


@pytest.mark.parametrize("pattern", ["lin0.*", "(lin0|vera_A).*"])
def test_regex_target_does_not_reach_into_vera_layers(pattern):
    model = get_peft_model(build_net(), VeraConfig(r=4, target_modules=pattern))
    before = {k.split(".default")[0] for k in model.state_dict()}
    model.add_adapter("other", VeraConfig(r=4, target_modules=pattern))
    after = {k.split(".default")[0].split(".other")[0] for k in model.state_dict()}
    assert after == before
    assert model.base_model.targeted_module_names == ["lin0"]


def test_dropout_is_functional_and_only_in_training():
    model = _vera(vera_dropout=0.5)
    layer = model.base_model.model.lin0
    assert layer.vera_dropout == {"default": 0.5}
    assert not any("dropout" in name for name, _ in model.named_modules())
    x = inputs()
    model.eval()
    eval_out = model(x)
    torch.testing.assert_close(model(x), eval_out, rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    assert (model(x) - eval_out).abs().max() > 1e-4
