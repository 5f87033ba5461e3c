"""The seed API of the issue (the official LoRA-GA README's flow) runs exactly as written, with an accelerate
`Accelerator`, on a tiny Llama; the final adapter loaded on the ORIGINAL base reproduces the trained model."""

import pytest
import torch

from tests.tuners.loraga.helpers import token_batches


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)  # no process-wide state left for other tests


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _train(model, batches, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_seed_api_as_written(tmp_path, accelerator):
    model, base_model, save_dir = _model(), _model(), str(tmp_path / "adapter")
    rows = [{"input_ids": ids, "labels": ids} for b in token_batches(3, seq=10) for ids in b["input_ids"]]
    dataloader = torch.utils.data.DataLoader(rows, batch_size=2)  # the user's own estimation batches
    probe = token_batches(1, seed=5)[0]["input_ids"]
    original = _logits(model, probe)

    # --- the seed API line by line (the `...` filled in; at_init / trained probe the model) ------------
    from peft import get_peft_model, PeftModel, LoraGAConfig  # noqa: I001
    from peft.utils.lora_ga_utils import (estimate_gradient, LoraGAContext,
                                          save_loraga_model_init, save_loraga_model_final)
    config = LoraGAConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16, use_rslora=True)
    named_grad = estimate_gradient(model=model, dataloader=dataloader, accelerator=accelerator,
                                   quant_flag=False)
    with LoraGAContext(model=model, named_grad=named_grad):
        model = get_peft_model(model=model, peft_config=config, adapter_name="default")
    save_loraga_model_init(model, save_dir=save_dir)
    at_init = _logits(model, probe)
    _train(model, token_batches(2, seq=12))   # ... train ...
    trained = _logits(model, probe)
    save_loraga_model_final(model, save_dir=save_dir)
    model = PeftModel.from_pretrained(base_model, save_dir)   # on the ORIGINAL base weights
    # ---------------------------------------------------------------------------------------------------------

    assert len(named_grad) == 1 + 7 + 1  # every Linear of the block, the embedding and the head (no peft_config)
    torch.testing.assert_close(at_init, original, rtol=1e-5, atol=1e-5)
    assert (trained - original).abs().max() > 1e-3
    final = model.peft_config["default"]
    assert final.peft_type.value == "LORA" and final.r == 16 and final.lora_alpha == pytest.approx(16 * 2**0.5)
    torch.testing.assert_close(_logits(model, probe), trained, rtol=1e-5, atol=1e-5)
