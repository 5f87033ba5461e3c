"""LoHa / LoKr on transformers models: default targets, "all-linear", half-precision bases, Trainer-style reload."""

from __future__ import annotations

import pytest
import torch

from peft import LoHaConfig, LoKrConfig, PeftModel, get_peft_model
from peft.tuners.lycoris_common import LycorisLayerBase
from tests.helpers.tiny_models import tiny_llama, token_ids

CLASSES = [LoHaConfig, LoKrConfig]


def _targets(model):
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LycorisLayerBase)})


@pytest.mark.parametrize("cls", CLASSES)
def test_default_targets_follow_the_architecture_table(cls):
    model = get_peft_model(tiny_llama(), cls(task_type="CAUSAL_LM"))
    assert _targets(model) == ["q_proj", "v_proj"]  # upstream's LoRA table, which LoHa and LoKr reuse


@pytest.mark.parametrize("cls", CLASSES)
def test_all_linear_skips_the_output_layer(cls):
    model = get_peft_model(tiny_llama(), cls(task_type="CAUSAL_LM", target_modules="all-linear"))
    assert "lm_head" not in _targets(model) and {"q_proj", "down_proj"} <= set(_targets(model))


@pytest.mark.parametrize("cls", CLASSES)
def test_unknown_architecture_without_targets_is_refused(cls):
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), cls())


@pytest.mark.parametrize("cls", CLASSES)
def test_bf16_base_keeps_fp32_factors_and_merges(cls):
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), cls(task_type="CAUSAL_LM", init_weights=False,
                                                                 target_modules=["q_proj", "o_proj"]))
    factors = [p for n, p in model.named_parameters() if p.requires_grad]
    assert factors and all(p.dtype == torch.float32 for p in factors)
    ids = token_ids()
    with torch.no_grad():
        out = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - merged.float()).abs().max() < 0.1 * out.float().abs().max()


@pytest.mark.parametrize("cls", CLASSES)
def test_load_adapter_trainable_then_inference(cls, tmp_path):
    model = get_peft_model(tiny_llama(), cls(task_type="CAUSAL_LM", init_weights=False, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n.split(".")[-2] for n, p in trainable.named_parameters() if p.requires_grad} <= {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
    trainable.load_adapter(str(tmp_path), "again")
    trainable.set_adapter("again")
    with torch.no_grad():
        assert torch.allclose(trainable(input_ids=ids).logits, expected, atol=1e-5)
