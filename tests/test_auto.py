"""`AutoPeftModel*`: base built from the adapter config's `base_model_name_or_path`, adapter loaded onto it."""

from __future__ import annotations

import json

import pytest
import torch

import peft
from peft import LoraConfig, PeftModel, get_peft_model
from tests.helpers.tiny_models import VOCAB, token_ids


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, num_labels=2)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                               num_decoder_layers=1, num_heads=2, decoder_start_token_id=0))


def _bert(cls_name: str):
    import transformers

    return getattr(transformers, cls_name)(_bert_config())


IDS = token_ids()
CASES = {
    "AutoPeftModelForCausalLM": (_llama, "CAUSAL_LM", ["q_proj", "v_proj"], {"input_ids": IDS}),
    "AutoPeftModelForSeq2SeqLM": (_t5, "SEQ_2_SEQ_LM", ["q", "v"], {"input_ids": IDS, "decoder_input_ids": IDS}),
    "AutoPeftModelForSequenceClassification": (lambda: _bert("BertForSequenceClassification"), "SEQ_CLS",
                                               ["query", "value"], {"input_ids": IDS}),
    "AutoPeftModelForTokenClassification": (lambda: _bert("BertForTokenClassification"), "TOKEN_CLS",
                                            ["query", "value"], {"input_ids": IDS}),
    "AutoPeftModelForQuestionAnswering": (lambda: _bert("BertForQuestionAnswering"), "QUESTION_ANS",
                                          ["query", "value"], {"input_ids": IDS}),
    "AutoPeftModelForFeatureExtraction": (lambda: _bert("BertModel"), "FEATURE_EXTRACTION", ["query", "value"],
                                          {"input_ids": IDS}),
}


def _first_tensor(out) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output tensor in {type(out).__name__}")


def _saved(tmp_path, build, task, targets):
    torch.manual_seed(0)
    base_path = str(tmp_path / "base")
    build().save_pretrained(base_path)
    import transformers

    auto = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
            "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
            "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}[task]
    torch.manual_seed(1)
    model = get_peft_model(getattr(transformers, auto).from_pretrained(base_path),
                           LoraConfig(task_type=task, r=4, target_modules=targets, init_lora_weights=False)).eval()
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    return model, adapter


@pytest.mark.parametrize("cls_name", list(CASES))
def test_auto_class_loads_base_and_adapter(tmp_path, cls_name):
    build, task, targets, inputs = CASES[cls_name]
    model, adapter = _saved(tmp_path, build, task, targets)
    saved = json.loads(open(f"{adapter}/adapter_config.json").read())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = getattr(peft, cls_name).from_pretrained(adapter)
    assert isinstance(loaded, PeftModel)
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(loaded(**inputs)), _first_tensor(model(**inputs)), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = getattr(peft, cls_name).from_pretrained(adapter, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_generic_auto_peft_model_follows_task_type(tmp_path):
    model, adapter = _saved(tmp_path, _llama, "CAUSAL_LM", ["q_proj"])
    loaded = peft.AutoPeftModel.from_pretrained(adapter)
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_task_mismatch_and_missing_base_are_clear_errors(tmp_path):
    _, adapter = _saved(tmp_path, _llama, "CAUSAL_LM", ["q_proj"])
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'.*AutoModelForSequenceClassification"):
        peft.AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    cfg = json.loads(open(f"{adapter}/adapter_config.json").read())
    cfg["base_model_name_or_path"] = None
    open(f"{adapter}/adapter_config.json", "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="names no base model"):
        peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    with pytest.raises(OSError, match="from_pretrained"):
        peft.AutoPeftModelForCausalLM()
