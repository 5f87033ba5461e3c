"""LoRA-GA on a bitsandbytes-quantized base (CPU): gradients estimated on the float model, the residual
`W - s B A` requantized with each layer's own settings (nf4 + double quant stays nf4 + double quant; int8 keeps
its threshold)."""

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from peft import LoraGAConfig, get_peft_model  # noqa: E402
from peft.tuners.loraga.model import factor_params  # noqa: E402
from peft.utils.lora_ga_utils import LoraGAContext, estimate_gradient  # noqa: E402
from peft.utils.quantization import add_to_bnb_weight, bnb_quant_settings, dequantize_bnb_layer  # noqa: E402
from tests.tuners.loraga.helpers import token_batches  # noqa: E402

QUANT = {
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("loraga-float")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _requantized_by_bnb(name, target, settings):
    """(`target` quantized and dequantized by bitsandbytes' functional API with the literal settings of QUANT[name],
    allowed difference): nf4 + double quant, blocksize 64, exactly; int8: per-row absmax codes, one code step."""
    F = bnb.functional
    if name == "int8":
        w = target.half().float()
        scale = w.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
        return torch.round(w / scale) * scale, 1.001 * scale  # rounding ties may land one code apart
    codes, state = F.quantize_4bit(target.to(settings.weight_dtype), blocksize=64, compress_statistics=True,
                                   quant_type="nf4")
    return F.dequantize_4bit(codes, state).float(), 1e-6


@pytest.mark.parametrize("name", list(QUANT))
def test_quantized_residual_keeps_layer_settings(float_dir, name):
    batches = token_batches(2)
    float_model = LlamaForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    config = LoraGAConfig(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4)
    grads = estimate_gradient(float_model, batches, peft_config=config)
    qmodel = LlamaForCausalLM.from_pretrained(float_dir, quantization_config=QUANT[name], device_map="cpu").eval()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        ref = qmodel(input_ids=ids).logits
    bases = {k: m for k, m in qmodel.named_modules() if k.endswith(("q_proj", "down_proj"))}
    before = {k: (bnb_quant_settings(m), copy.deepcopy(m)) for k, m in bases.items()}
    with LoraGAContext(model=qmodel, named_grad=grads):
        peft_model = get_peft_model(qmodel, config)
    for key, layer in peft_model.base_model.tuner_layers():
        settings, old = before[key]
        base = layer.get_base_layer()
        assert bnb_quant_settings(base) == settings
        if name == "int8":
            assert base.state.threshold == 5.0 and not base.state.has_fp16_weights
        else:
            assert base.weight.quant_type == "nf4" and base.weight.quant_state.nested
        A, B = factor_params(layer, "default")
        with torch.no_grad():
            target = dequantize_bnb_layer(old) - layer.scaling["default"] * (B.float() @ A.float())
        reference, step = _requantized_by_bnb(name, target, settings)
        assert ((dequantize_bnb_layer(base) - reference).abs() <= step).all()
        add_to_bnb_weight(old, layer.scaling["default"] * (B.float() @ A.float()), sign=-1)
        torch.testing.assert_close(dequantize_bnb_layer(base), dequantize_bnb_layer(old), rtol=0, atol=0)
    with torch.no_grad():
        out = peft_model(input_ids=ids).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel  # only the requantization of the residual separates them
