"""Mixed adapter batches (`adapter_names=[...]`): sample i of a batch through adapter names[i] only ("__base__": none).

The invariant: each sample's output equals running its sub-batch alone with `set_adapter(name)` (or inside
`disable_adapter()` for "__base__"), in float64 (the base layer sees the full batch instead of the sub-batch, so
the two agree to rounding: atol 1e-12). Refusals are ValueErrors naming the bad value, and leave no hook behind.
"""

import pytest
import torch
from torch import nn

from peft import LoraConfig, get_peft_model
from peft.tuners.lora.mixed_batch import generation_expansion, repeat_per_beam, sample_groups

BASE = "__base__"


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(self.emb(X)))).sum(1)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6 * 4 * 4, 3)

    def forward(self, X):
        return self.lin(torch.relu(self.conv(X)).flatten(1))


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, X):
        return self.mha(X, X, X)[0]


def two_adapters(model, config0, config1):
    torch.manual_seed(0)
    peft_model = get_peft_model(model.double(), config0, "a0")
    peft_model.add_adapter("a1", config1)
    return peft_model.eval()


def alone(model, x, name):
    """The reference: `x` through one adapter (or the base) by the ordinary API."""
    if name == BASE:
        with model.disable_adapter():
            return model(x)
    model.set_adapter(name)
    return model(x)


def check_mixed(model, x, names):
    out = model(x, adapter_names=names)
    for name, index in sample_groups(names):
        close(out[index], alone(model, x[index], name))
    return out


def lora(**kwargs):
    return LoraConfig(init_lora_weights=False, **kwargs)


def no_hooks_left(model):
    for module in model.modules():
        assert not module._forward_pre_hooks and "forward" not in module.__dict__


# --- pure helpers ---------------------------------------------------------------------------------------------------
def test_sample_groups_and_beams():
    assert sample_groups(["b", "a", "b", BASE]) == [("b", [0, 2]), ("a", [1]), (BASE, [3])]
    assert repeat_per_beam(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    assert repeat_per_beam(["a", "b"], None) == ["a", "b"]


def test_generation_expansion():
    from transformers import GenerationConfig

    assert generation_expansion({}) == 1
    assert generation_expansion({"num_beams": 4, "num_return_sequences": 2}) == 4
    assert generation_expansion({"num_return_sequences": 3, "do_sample": True}) == 3
    model_default = GenerationConfig(num_beams=5)
    assert generation_expansion({}, model_default) == 5  # the model's own generation_config counts too
    assert generation_expansion({"num_beams": 2}, model_default) == 2
    assert generation_expansion({"generation_config": GenerationConfig(num_beams=3)}, model_default) == 3


# --- layers ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets1", [["lin0"], ["lin0", "lin1"], ["lin1"], ["emb", "lin1"]])
def test_linear_and_embedding(targets1):
    model = two_adapters(MLP(), lora(target_modules=["emb", "lin0"]), lora(target_modules=targets1, r=4))
    x = torch.randint(0, 30, (9, 5))
    names = [[BASE, "a0", "a1"][i % 3] for i in range(9)]
    out = check_mixed(model, x, names)
    assert not torch.allclose(out[0], alone(model, x, "a0")[0])  # the adapters do change the output
    no_hooks_left(model)


def test_conv2d_and_modules_to_save():
    config0 = lora(target_modules=["conv"], modules_to_save=["lin"])
    model = two_adapters(ConvNet(), config0, lora(target_modules=["conv"], r=6, modules_to_save=["lin"]))
    with torch.no_grad():  # the two copies of `lin` differ from the original and from each other
        model.base_model.model.lin.modules_to_save["a0"].weight.add_(0.1)
        model.base_model.model.lin.modules_to_save["a1"].weight.sub_(0.2)
    x = torch.randn(7, 3, 4, 4, dtype=torch.float64)
    check_mixed(model, x, ["a1", BASE, "a0", "a0", "a1", BASE, "a1"])
    no_hooks_left(model)


def test_all_base_equals_disabled_and_disabled_wins():
    model = two_adapters(MLP(), lora(target_modules=["lin0"]), lora(target_modules=["lin0"]))
    x = torch.randint(0, 30, (4, 5))
    with model.disable_adapter():
        base = model(x)
        close(model(x, adapter_names=["a0", "a1", "a0", "a1"]), base)  # disabled adapters win, as upstream
    close(model(x, adapter_names=[BASE] * 4), base)


def test_multihead_attention_refused():
    model = two_adapters(Attn(), lora(target_modules=["mha"]), lora(target_modules=["mha"]))
    with pytest.raises(ValueError, match="lora.MultiheadAttention does not support mixed adapter batches"):
        model(torch.randn(3, 2, 8, dtype=torch.float64), adapter_names=["a0", "a1", BASE])
    no_hooks_left(model)


# --- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "names, match",
    [
        (["a0"] * 3, "Length of `adapter_names` should be the same as the number of inputs, but got 3 and 4"),
        (["a0", "nope", "a1", "zzz"], r"non-existing adapter\(s\): nope, zzz"),
        ("a0", "Invalid adapter_names='a0'"),
        (["a0", 1, "a0", "a0"], r"Invalid adapter_names=\['a0', 1"),
    ],
)
def test_bad_names_refused(names, match):
    model = two_adapters(MLP(), lora(target_modules=["lin0"]), lora(target_modules=["lin0"]))
    x = torch.randint(0, 30, (4, 5))
    before = model(x)
    with pytest.raises(ValueError, match=match):
        model(x, adapter_names=names)
    no_hooks_left(model)
    close(model(x), before)


def test_training_merged_and_dora_refused():
    model = two_adapters(MLP(), lora(target_modules=["lin0"]), lora(target_modules=["lin0"], use_dora=True))
    x = torch.randint(0, 30, (2, 5))
    with pytest.raises(ValueError, match=r"\['a1'\] use DoRA"):
        model(x, adapter_names=["a0", "a1"])
    model(x, adapter_names=["a0", BASE])  # the DoRA adapter not named: fine, as upstream
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=["a0", BASE])
    model.eval()
    model.base_model.merge_adapter(["a0"])
    with pytest.raises(ValueError, match=r"merged adapters.*\['a0'\]"):
        model(x, adapter_names=["a0", BASE])
    no_hooks_left(model)


# --- a tiny Llama: forward and generate -----------------------------------------------------------------------------
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config).double()
    config0 = lora(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "embed_tokens"])
    config1 = lora(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"], r=4)
    model = get_peft_model(base, config0, "a0")
    model.add_adapter("a1", config1)
    return model.eval()


def test_llama_forward():
    model = tiny_llama()
    ids = torch.randint(0, 50, (5, 6))
    logits = model(input_ids=ids, adapter_names=["a1", "a0", BASE, "a1", "a0"]).logits
    for name, index in sample_groups(["a1", "a0", BASE, "a1", "a0"]):
        close(logits[index], alone(model, ids[index], name).logits)
    no_hooks_left(model)


@pytest.mark.parametrize("num_beams, num_return", [(1, 1), (3, 1), (3, 2)])
def test_llama_generate(num_beams, num_return):
    model = tiny_llama()
    ids = torch.randint(0, 50, (3, 4))
    names = ["a1", BASE, "a0"]
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, num_return_sequences=num_return,
                  pad_token_id=0)
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    assert len(mixed) == 3 * num_return
    for i, name in enumerate(names):
        if name == BASE:
            with model.disable_adapter():
                single = model.generate(input_ids=ids[i:i + 1], **kwargs)
        else:
            model.set_adapter(name)
            single = model.generate(input_ids=ids[i:i + 1], **kwargs)
        rows, n = mixed[i * num_return:(i + 1) * num_return], single.shape[1]
        assert torch.equal(rows[:, :n], single)  # a sample that ended early is padded: pad (0) or eos (2)
        assert set(rows[:, n:].flatten().tolist()) <= {0, 2}
    no_hooks_left(model)


def test_llama_trainable_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).double()
    model = get_peft_model(base, lora(target_modules=["q_proj"], trainable_token_indices=[1, 2, 3]), "a0")
    model.add_adapter("a1", lora(target_modules=["v_proj"], trainable_token_indices=[3, 4]))
    wrapper = model.base_model.model.model.embed_tokens
    with torch.no_grad():
        for name in ("a0", "a1"):
            wrapper.token_adapter.trainable_tokens_delta[name].add_(torch.randn_like(
                wrapper.token_adapter.trainable_tokens_delta[name]))
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]] * 3)
    names = ["a1", BASE, "a0"]
    logits = model(input_ids=ids, adapter_names=names).logits
    for name, index in sample_groups(names):
        close(logits[index], alone(model, ids[index], name).logits)
    assert not torch.allclose(logits[0], logits[2])
    no_hooks_left(model)


def test_t5_generate_beams_encoder_keeps_one_name_per_sample():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = T5ForConditionalGeneration(config).double()
    model = get_peft_model(base, lora(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"]), "a0")
    model.add_adapter("a1", lora(task_type="SEQ_2_SEQ_LM", target_modules=["k", "o"], r=4))
    model.eval()
    ids = torch.randint(2, 40, (3, 6))
    names = ["a0", BASE, "a1"]
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == BASE:
            with model.disable_adapter():
                single = model.generate(input_ids=ids[i:i + 1], **kwargs)
        else:
            model.set_adapter(name)
            single = model.generate(input_ids=ids[i:i + 1], **kwargs)
        n = single.shape[1]
        assert torch.equal(mixed[i:i + 1, :n], single) and set(mixed[i, n:].tolist()) <= {0, 1}
    no_hooks_left(model)
