"""Upstream 0.21.2 behaviours (issue 15, second part): `ensure_weight_tying`, biases in a file loading into a
`bias="none"` config, MultiheadAttention adapters in the base dtype (`autocast_adapter_dtype=False`, also with
`low_cpu_mem_usage`), and trainable-token adapters with overlapping rows refused when set active together.
The interop test at the end loads tied adapters both ways with the real upstream package."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import ModulesToSaveWrapper
from tests.helpers.tiny_models import VOCAB

TOKENS = torch.tensor([[1, 3, 5, 7, 60, 3], [60, 2, 7, 9, 4, 3]])


def tied_llama(seed: int = 0, tie: bool = True) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():  # each shared tensor once
        if param.requires_grad:
            param.add_(0.3 * torch.randn(param.shape, generator=gen))


def _inner(model):
    return model.get_base_model()


# --- ensure_weight_tying ---------------------------------------------------------------------------------------------
def test_lora_on_tied_embedding_and_head_shares_factors_and_update():
    model = get_peft_model(tied_llama(), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens", "lm_head"],
                                                    ensure_weight_tying=True))
    randomize(model)
    emb, head = _inner(model).model.embed_tokens, _inner(model).lm_head
    assert isinstance(emb, LoraLayer) and isinstance(head, LoraLayer)
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
    assert head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()
    # one update of the shared (vocab, dim) matrix: the head's delta is the embedding's
    torch.testing.assert_close(head.get_delta_weight("default"), emb.get_delta_weight("default"), rtol=0, atol=0)
    # upstream's rewrite: the input embedding's full name joins, the tied head's name leaves
    assert model.peft_config["default"].target_modules == {"q_proj", "embed_tokens", "model.embed_tokens"}
    expected = logits(model)
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied after merging
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_tied_lora_adapter_saves_and_reloads(tmp_path):
    config = LoraConfig(r=2, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True)
    model = get_peft_model(tied_llama(), config)
    randomize(model)
    expected = logits(model)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tied_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    head, emb = _inner(loaded).lm_head, _inner(loaded).model.embed_tokens
    assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()


def test_modules_to_save_on_tied_layers_share_one_trained_copy():
    model = get_peft_model(tied_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                    ensure_weight_tying=True))
    emb, head = _inner(model).model.embed_tokens, _inner(model).lm_head
    assert isinstance(emb, ModulesToSaveWrapper) and isinstance(head, ModulesToSaveWrapper)
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    assert model.peft_config["default"].modules_to_save == ["model.embed_tokens"]
    before = logits(model)
    with torch.no_grad():
        emb.modules_to_save["default"].weight[5].add_(1.0)  # one row of the shared matrix: both layers see it
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(head(hidden), hidden @ emb.modules_to_save["default"].weight.T)
    assert not torch.equal(logits(model), before)


@pytest.mark.parametrize("ensure, tie, message", [
    (True, False, "no tied modules were found in the model"),
    (False, True, "`ensure_weight_tying` is not set to True"),
])
def test_weight_tying_warnings(ensure, tie, message):
    with pytest.warns(UserWarning, match=message):
        get_peft_model(tied_llama(tie=tie), LoraConfig(target_modules=["q_proj", "lm_head"],
                                                      ensure_weight_tying=ensure))


def test_ensure_weight_tying_without_a_tied_target_warns_and_changes_nothing():
    with pytest.warns(UserWarning, match="no tied modules are added"):
        model = get_peft_model(tied_llama(), LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True))
    assert not isinstance(_inner(model).lm_head, (LoraLayer, ModulesToSaveWrapper))
    assert model.peft_config["default"].target_modules == {"q_proj"}


def test_trainable_tokens_tied_layers_with_other_ids_refused_under_ensure_weight_tying():
    base = tied_llama()
    before = copy.deepcopy(base.state_dict())
    config = LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [3]},
                        ensure_weight_tying=True)
    with pytest.raises(ValueError, match="Cannot ensure weight tying"):
        get_peft_model(base, config)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


# --- biases in a file, config with bias="none" --------------------------------------------------------------------
class Biased(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_load_into_a_bias_none_config_with_a_warning(bias):
    trained = get_peft_model(Biased(), LoraConfig(r=2, target_modules=["lin0"], bias=bias, init_lora_weights=False))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if name.endswith("bias") and param.requires_grad:  # the biases the saver trains
                param.fill_(1.23)
    x = torch.randn(4, 6)
    expected = trained(x)
    state = get_peft_model_state_dict(trained)
    target = get_peft_model(Biased(), LoraConfig(r=2, target_modules=["lin0"]))
    with pytest.warns(UserWarning, match=r"does not train them.*lin0\.base_layer\.bias"):
        set_peft_model_state_dict(target, state)
    torch.testing.assert_close(target(x), expected)


def test_a_base_weight_in_the_file_is_still_refused_and_nothing_loads():
    source = get_peft_model(Biased(), LoraConfig(r=2, target_modules=["lin0"], bias="all"))
    state = get_peft_model_state_dict(source)
    state["base_model.model.lin1.weight"] = torch.zeros(3, 8)
    target = get_peft_model(Biased(), LoraConfig(r=2, target_modules=["lin0"]))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"lin1\.weight"):
        set_peft_model_state_dict(target, state)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# --- MultiheadAttention: adapter dtype, low_cpu_mem_usage ---------------------------------------------------------
class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        x, _ = self.mha(x, x, x)
        return self.lin0(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_mha_adapter_takes_the_base_dtype_without_autocast(tmp_path, dtype, low_cpu_mem_usage):
    config = LoraConfig(target_modules=["mha"], init_lora_weights=False)
    model = get_peft_model(Mha().to(dtype), config, autocast_adapter_dtype=False)
    lora = {n: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4 and set(lora.values()) == {dtype}  # in_proj's and out_proj's A and B
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(Mha().to(dtype), str(tmp_path), autocast_adapter_dtype=False,
                                       low_cpu_mem_usage=low_cpu_mem_usage)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {dtype}
    assert not any(p.is_meta for p in loaded.parameters())
    x = torch.randn(3, 4, 10)
    torch.testing.assert_close(loaded(x.to(dtype)).float(), model(x.to(dtype)).float(), rtol=0, atol=0)


# --- trainable tokens: overlapping rows cannot be active together -------------------------------------------------
def test_overlapping_trainable_tokens_refused_on_set_adapter_model_unchanged():
    model = get_peft_model(tied_llama(tie=False), LoraConfig(target_modules=["q_proj"],
                                                            trainable_token_indices={"embed_tokens": [0, 4]}))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [4]}))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for TrainableTokensWrapper"):
        model.base_model.set_adapter(["default", "other"])
    assert model.base_model.active_adapters == ["default"] and all(m.active_adapters == ["default"] for m in layers)
    model.add_adapter("third", LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [9]}))
    model.base_model.set_adapter(["default", "third"])  # disjoint rows: fine
    assert _inner(model).model.embed_tokens.active_adapters == ["default", "third"]


def test_trainable_tokens_wrapper_lists_only_adapters_with_rows():
    model = get_peft_model(tied_llama(tie=False), LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [4]}))
    emb = _inner(model).model.embed_tokens
    assert emb.active_adapters == []
    model.set_adapter("other")
    assert emb.active_adapters == ["other"] and emb.token_adapter.trainable_tokens_delta["other"].requires_grad


# --- interop with upstream 0.21.2 ----------------------------------------------------------------------------------
_UPSTREAM = r'''
import sys, json, torch
from pathlib import Path
from transformers import LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
folder = Path(sys.argv[1])
ids = torch.load(folder / "ids.pt")
base = LlamaForCausalLM.from_pretrained(folder / "base").eval()
ours = PeftModel.from_pretrained(base, folder / "ours").eval()
with torch.no_grad():
    torch.save(ours(input_ids=ids).logits, folder / "upstream_on_ours.pt")
base = LlamaForCausalLM.from_pretrained(folder / "base").eval()
cfg = json.loads((folder / "config.json").read_text())
theirs = get_peft_model(base, LoraConfig(**cfg))
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for _, p in theirs.named_parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    torch.save(theirs.eval()(input_ids=ids).logits, folder / "upstream_own.pt")
theirs.save_pretrained(folder / "theirs")
emit({"ok": True})
'''


@pytest.mark.upstream
@pytest.mark.parametrize("kind", ["target_modules", "modules_to_save"])
def test_ensure_weight_tying_adapters_move_both_ways_with_upstream(tmp_path, kind):
    from tests.upstream_harness import UpstreamUnavailable, run_upstream

    cfg = dict(r=2, target_modules=["q_proj"], ensure_weight_tying=True)
    if kind == "target_modules":
        cfg["target_modules"] = ["q_proj", "lm_head"]
    else:
        cfg["modules_to_save"] = ["lm_head"]
    import json

    tied_llama().save_pretrained(str(tmp_path / "base"))
    torch.save(TOKENS, tmp_path / "ids.pt")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = get_peft_model(tied_llama(), LoraConfig(**cfg))
    randomize(ours)
    expected = logits(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    try:
        run_upstream(_UPSTREAM, args=[str(tmp_path)])
    except UpstreamUnavailable as exc:
        pytest.skip(str(exc))
    torch.testing.assert_close(torch.load(tmp_path / "upstream_on_ours.pt"), expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tied_llama(), str(tmp_path / "theirs"))
    torch.testing.assert_close(logits(loaded), torch.load(tmp_path / "upstream_own.pt"), rtol=1e-5, atol=1e-5)
