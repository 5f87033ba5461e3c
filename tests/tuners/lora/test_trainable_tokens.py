"""`LoraConfig(trainable_token_indices=...)`: a few embedding rows train beside LoRA (upstream PEFT 0.21's feature).

References are built by hand here: the adapter's embedding matrix is `W'` = `W` with rows `t` replaced by the
trained rows `D`, so the embedding output is `F.embedding(ids, W')` and a tied output layer computes `h W'^T`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.trainable_tokens.functional import forward_with_rows
from peft.utils import get_peft_model_state_dict
from peft.utils.other import AuxiliaryTrainingWrapper
from tests.helpers.tiny_models import VOCAB, tiny_custom, tiny_gpt2, tiny_llama, tiny_t5

IDS = [3, 7, 60]
TOKENS = torch.tensor([[1, 3, 5, 7, 60, 3], [60, 2, 7, 9, 4, 3]])
DELTA_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def tied_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def lora(**kwargs) -> LoraConfig:
    kwargs.setdefault("trainable_token_indices", {"embed_tokens": IDS})
    return LoraConfig(target_modules=["q_proj", "v_proj"], **kwargs)


def logits(model: nn.Module, ids: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def embed(model: nn.Module):
    return model.get_base_model().model.embed_tokens


@torch.no_grad()
def randomize(model: nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Give the adapter's rows and LoRA B random values (so it changes the output)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f".{adapter}." in name + "." and ("trainable_tokens_delta" in name or "lora_B" in name):
            param.add_(0.5 * torch.randn(param.shape, generator=gen))


def reference_matrix(weight: torch.Tensor, ids: list[int], rows: torch.Tensor) -> torch.Tensor:
    out = weight.detach().clone()
    for i, token in enumerate(ids):
        out[token] = rows[i]
    return out


# --- config ---------------------------------------------------------------------------------------------------------
def test_config_field_round_trips_through_json(tmp_path):
    import numpy as np

    config = LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": (np.int64(5), 2)})
    assert config.trainable_token_indices == {"embed_tokens": [5, 2]}
    config.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": [5, 2]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PeftConfig.from_pretrained(str(tmp_path)).trainable_token_indices == {"embed_tokens": [5, 2]}
    assert LoraConfig(trainable_token_indices=[4, 1]).trainable_token_indices == [4, 1]


@pytest.mark.parametrize("bad", [[-1], ["a"], [1.5], [True], [], [2, 2], 3, "embed_tokens", {}, {"": [1]},
                                 {"embed_tokens": "x"}, {"embed_tokens": [-3]}, {1: [2]}])
def test_bad_indices_are_a_value_error_naming_them(bad):
    with pytest.raises(ValueError, match="trainable_token_indices"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=bad)


def test_value_assigned_after_construction_is_checked():
    """TRL sets `peft_config.trainable_token_indices = {...}` on a built config: a bad value is refused at the
    assignment; an out-of-range id (the vocabulary is the model's) when the adapter is injected."""
    model = tiny_llama()
    config = LoraConfig(target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"trainable_token_indices\['embed_tokens'\]=\[4, -1\]"):
        config.trainable_token_indices = {"embed_tokens": [4, -1]}
    config.trainable_token_indices = {"embed_tokens": [4, VOCAB]}
    with pytest.raises(ValueError, match="out of range"):
        get_peft_model(model, config)
    assert not any(isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


@pytest.mark.parametrize("config, match", [
    (lora(trainable_token_indices=[3, VOCAB]), "out of range"),
    (lora(trainable_token_indices={"no_such_module": [3]}), "no_such_module"),
    (LoraConfig(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]), "LoRA target"),
    (lora(modules_to_save=["embed_tokens"]), "modules_to_save"),
    (lora(trainable_token_indices={"layers.0.mlp": [3]}), "LlamaMLP"),
])
def test_unusable_targets_are_refused_and_leave_the_model_as_it_was(config, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, config)
    assert not any(isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_on_a_tied_output_layer_is_refused():
    model = tied_llama()
    config = LoraConfig(target_modules=["q_proj", "lm_head"], trainable_token_indices=IDS)
    with pytest.raises(ValueError, match="lm_head.*tied"):
        get_peft_model(model, config)
    assert not any(isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_trl_style_config_with_the_tied_head_in_modules_to_save(tmp_path):
    """TRL assigns `{"embed_tokens": added_tokens}` to a built config and asks for `modules_to_save=["lm_head"]`:
    the head then trains as its own copy (no longer tied), and only the embedding wrapper has rows."""
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], modules_to_save=["lm_head"])
    config.trainable_token_indices = {"embed_tokens": IDS}
    model = get_peft_model(tied_llama(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{DELTA_KEY}.default", "base_model.model.lm_head.modules_to_save.default.weight"} <= trainable
    randomize(model)
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.add_(0.1)
    expected = logits(model)
    model.save_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tied_llama(), str(tmp_path))), expected,
                               rtol=0, atol=0)


def test_a_later_adapter_cannot_put_lora_around_the_wrapped_embedding():
    model = get_peft_model(tiny_llama(), lora())
    randomize(model)
    before = logits(model)
    with pytest.raises(ValueError, match="cannot also be a LoRA target"):
        model.add_adapter("other", LoraConfig(target_modules=["embed_tokens"]))
    assert "other" not in model.peft_config and isinstance(embed(model), AuxiliaryTrainingWrapper)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


# --- forward and training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tied_llama])
def test_forward_replaces_the_chosen_rows_and_starts_equal_to_the_base(build):
    base = logits(build())
    model = get_peft_model(build(), lora())
    torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    randomize(model)
    wrapper = embed(model)
    weight, rows = wrapper.base_layer.weight, wrapper.trainable_tokens_delta["default"]
    expected = F.embedding(TOKENS, reference_matrix(weight, IDS, rows))
    torch.testing.assert_close(wrapper(TOKENS), expected, rtol=0, atol=0)
    torch.testing.assert_close(wrapper.weight, reference_matrix(weight, IDS, rows), rtol=0, atol=0)


def test_training_changes_only_the_chosen_rows():
    model = get_peft_model(tiny_llama(dtype=torch.float64), lora())
    wrapper = embed(model)
    base_weight = wrapper.base_layer.weight.detach().clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"{DELTA_KEY}.default" in trainable and not any("embed_tokens.token_adapter.base_layer" in n
                                                           for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(input_ids=TOKENS, labels=TOKENS)
    out.loss.backward()
    delta = wrapper.trainable_tokens_delta["default"]
    assert wrapper.base_layer.weight.grad is None
    assert delta.grad.abs().sum(dim=1).gt(0).all(), "every chosen row appears in TOKENS, so every row has a gradient"

    # the same gradient through the full matrix W' in the plain model (LoRA's B is zero at init, so the LoRA
    # branches add nothing): independent of the wrapper's row-gather forward
    reference = tiny_llama(dtype=torch.float64)
    reference.model.embed_tokens.weight = nn.Parameter(reference_matrix(base_weight, IDS, delta.detach()))
    reference(input_ids=TOKENS, labels=TOKENS).loss.backward()
    full_grad = reference.model.embed_tokens.weight.grad
    torch.testing.assert_close(delta.grad, full_grad[IDS], rtol=1e-10, atol=1e-12)

    optimizer.step()
    changed = (wrapper.weight.detach() != base_weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(IDS)
    assert torch.equal(wrapper.base_layer.weight, base_weight)


@pytest.mark.parametrize("build", [tied_llama, tiny_gpt2])
def test_a_tied_output_layer_sees_the_same_rows(build):
    model = get_peft_model(build(), LoraConfig(target_modules=["q_proj"] if build is tied_llama else ["c_attn"],
                                               trainable_token_indices=IDS))
    randomize(model)
    inner = model.get_base_model()
    source, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    assert isinstance(head, AuxiliaryTrainingWrapper) and head.tied_to is source
    assert head.base_layer.weight is source.base_layer.weight
    hidden = torch.randn(2, 5, source.base_layer.weight.shape[1])
    w_prime = reference_matrix(source.base_layer.weight, IDS, source.trainable_tokens_delta["default"])
    torch.testing.assert_close(head(hidden), hidden @ w_prime.T, rtol=1e-6, atol=1e-6)
    assert head.adapter_state_dict_load_map("default") == {}
    assert not [k for k in model.state_dict() if "lm_head" in k and "trainable_tokens" in k]
    file_keys = list(get_peft_model_state_dict(model))
    assert [k for k in file_keys if "trainable_tokens" in k] == [
        k for k in file_keys if k.endswith("token_adapter.trainable_tokens_delta")] and len(
        [k for k in file_keys if "trainable_tokens" in k]) == 1


def test_rows_forward_matches_the_full_matrix_for_each_layer_kind():
    """The row-gather / column-patch paths agree with running the layer on the full `W'`."""

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 3.0

    torch.manual_seed(0)
    index, ids = torch.tensor([5, 1]), torch.randint(0, 12, (3, 7))
    for layer, x in ((nn.Embedding(12, 4), ids), (Scaled(12, 4), ids), (nn.Linear(4, 12), torch.randn(3, 4))):
        values = torch.randn(2, 4, requires_grad=True)
        w_prime = reference_matrix(layer.weight, [5, 1], values.detach())
        expected = torch.func.functional_call(layer, {"weight": w_prime}, (x,))
        torch.testing.assert_close(forward_with_rows(layer, [(index, values)], x), expected)


# --- adapter management ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tied_llama])
def test_disable_merge_unmerge_and_unload(build):
    base_model = build()
    base = logits(base_model)
    weight = base_model.model.embed_tokens.weight.detach().clone()
    model = get_peft_model(build(), lora())
    randomize(model)
    adapted = logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, rtol=1e-6, atol=1e-6)
    with model.disable_adapter():  # disabling a merged adapter puts the original rows back (LoRA: up to rounding)
        torch.testing.assert_close(logits(model), base, rtol=1e-6, atol=1e-6)
        assert torch.equal(embed(model).base_layer.weight, weight)
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(embed(model).base_layer.weight, weight)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) for m in merged.modules())
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)
    if build is tied_llama:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight

    model = get_peft_model(build(), lora())
    randomize(model)
    plain = model.unload()
    assert not any(isinstance(m, AuxiliaryTrainingWrapper) for m in plain.modules())
    assert torch.equal(plain.model.embed_tokens.weight, weight)


def test_several_adapters_set_adapter_and_delete_adapter():
    model = get_peft_model(tiny_llama(), lora())
    randomize(model, "default", seed=1)
    model.add_adapter("other", lora(trainable_token_indices={"embed_tokens": [9, 2]}))
    randomize(model, "other", seed=2)
    first = logits(model)
    model.set_adapter("other")
    second = logits(model)
    assert (first - second).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"{DELTA_KEY}.other" in trainable and f"{DELTA_KEY}.default" not in trainable
    model.base_model.set_adapter(["default", "other"])  # disjoint rows: both apply
    wrapper = embed(model)
    expected = reference_matrix(reference_matrix(wrapper.base_layer.weight, IDS, wrapper.trainable_tokens_delta[
        "default"]), [9, 2], wrapper.trainable_tokens_delta["other"])
    torch.testing.assert_close(wrapper(TOKENS), F.embedding(TOKENS, expected), rtol=0, atol=0)
    model.delete_adapter("default")
    assert model.active_adapters == ["other"] and list(wrapper.token_indices) == ["other"]
    torch.testing.assert_close(logits(model), second, rtol=0, atol=0)


def test_overlapping_rows_cannot_be_active_together():
    model = get_peft_model(tiny_llama(), lora())
    model.add_adapter("other", lora(trainable_token_indices={"embed_tokens": [IDS[0]]}))
    with pytest.raises(ValueError, match=f"both train token {IDS[0]}"):  # refused when set (upstream's rule)
        model.base_model.set_adapter(["default", "other"])
    assert model.base_model.active_adapters == ["default"]


# --- save and load --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tied_llama])
def test_save_and_from_pretrained_give_the_same_outputs(build, tmp_path):
    model = get_peft_model(build(), lora())
    randomize(model)
    model.add_adapter("other", lora(trainable_token_indices={"embed_tokens": [9]}))
    randomize(model, "other", seed=3)
    expected = logits(model)
    model.set_adapter("other")
    expected_other = logits(model)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved[DELTA_KEY].shape == (len(IDS), 16) and not [k for k in saved if k.endswith(".default")]
    assert load_file(str(tmp_path / "other" / "adapter_model.safetensors"))[DELTA_KEY].shape == (1, 16)

    loaded = PeftModel.from_pretrained(build(), str(tmp_path))
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "trainable_tokens" in n)
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other", is_trainable=True)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded), expected_other, rtol=0, atol=0)
    assert loaded.base_model.model.model.embed_tokens.trainable_tokens_delta["other"].requires_grad


def test_a_failed_load_puts_the_tied_layers_back(tmp_path):
    model = get_peft_model(tied_llama(), lora())
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["trainable_token_indices"] = {"embed_tokens": IDS[:2]}  # the file holds 3 rows
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = tied_llama()
    with pytest.raises(ValueError, match="trainable_tokens_delta"):
        PeftModel.from_pretrained(base, str(tmp_path))
    assert not any(isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) for m in base.modules())
    assert type(base.lm_head) is nn.Linear and base.lm_head.weight is base.model.embed_tokens.weight


def test_transformers_load_adapter_reads_the_rows_through_the_load_map(tmp_path):
    for build in (tiny_llama, tied_llama):
        model = get_peft_model(build(), lora())
        randomize(model)
        expected = logits(model)
        model.save_pretrained(str(tmp_path / build.__name__))
        plain = build()
        plain.load_adapter(str(tmp_path / build.__name__))  # transformers' integration, not PeftModel
        torch.testing.assert_close(logits(plain), expected, rtol=0, atol=0)
        plain.disable_adapters()
        torch.testing.assert_close(logits(plain), logits(build()), rtol=0, atol=0)
        plain.delete_adapter("default")
        assert not any(isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper)) for m in plain.modules())


def test_half_precision_base_trains_fp32_rows(tmp_path):
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), lora())
    wrapper = embed(model)
    assert wrapper.trainable_tokens_delta["default"].dtype == torch.float32
    randomize(model)
    assert wrapper(TOKENS).dtype == torch.bfloat16
    expected = logits(model)
    model.save_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(dtype=torch.bfloat16), str(tmp_path))),
                               expected, rtol=0, atol=0)


def test_wrapper_load_map_and_upstream_import_path():
    from peft.utils.other import TrainableTokensWrapper

    model = get_peft_model(tiny_llama(), lora())
    wrapper = embed(model)
    assert isinstance(wrapper, TrainableTokensWrapper) and isinstance(wrapper, AuxiliaryTrainingWrapper)
    load_map = wrapper.adapter_state_dict_load_map("default")
    assert load_map == {"token_adapter.trainable_tokens_delta": "token_adapter.trainable_tokens_delta.default"}
    in_memory = {k.removeprefix("model.embed_tokens.") for k in model.get_base_model().state_dict()}
    assert set(load_map.values()) <= in_memory
    assert wrapper.adapter_state_dict_load_map("absent") == {}
    assert wrapper.num_embeddings == VOCAB and wrapper.original_module is wrapper.base_layer


def test_custom_model_takes_a_dict_naming_its_embedding():
    base = tiny_custom()
    ids = torch.randint(0, VOCAB, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(ids)
    model = get_peft_model(tiny_custom(), LoraConfig(target_modules=["lin1"], trainable_token_indices={"emb": [1]}))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected)
    with pytest.raises(ValueError, match="get_input_embeddings"):
        get_peft_model(tiny_custom(), LoraConfig(target_modules=["lin1"], trainable_token_indices=[1]))


# --- upstream PEFT 0.21.2 -------------------------------------------------------------------------------------------
UPSTREAM_SCRIPT = r'''
import json, sys, torch, transformers
from pathlib import Path
from peft import LoraConfig, PeftModel, get_peft_model

work = Path(sys.argv[1])
cases = json.loads((work / "cases.json").read_text())
def base(case):
    cls = getattr(transformers, case["model_class"])
    return cls.from_pretrained(case["base_dir"], dtype=torch.float32).eval()
def logits(model):
    with torch.no_grad():
        return model(**inputs).logits
report = {}
for name, case in cases.items():
    folder = Path(case["dir"])
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    model = PeftModel.from_pretrained(base(case), case["ours"])
    torch.save(logits(model), folder / "up_on_ours.pt")
    model = get_peft_model(base(case), LoraConfig(**case["config"]))
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
    torch.save(logits(model), folder / "up_own.pt")
    model.save_pretrained(case["upstream"])
    report[name] = {"lm_head": type(model.base_model.model.lm_head).__name__}
    if name.startswith("t5"):
        report[name]["encoder"] = type(model.base_model.model.encoder.embed_tokens).__name__
emit(report)
'''

INTEROP_CASES = {
    "llama_dict": ("llama", dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                 trainable_token_indices={"embed_tokens": IDS})),
    "gpt2_tied_list": ("gpt2", dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["c_attn"],
                                    trainable_token_indices=IDS)),
    # T5: `shared`, `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` are four modules, one weight
    "t5_tied_list": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=2, lora_alpha=4, target_modules=["q", "v"],
                                trainable_token_indices=IDS)),
}
BUILDERS = {"llama": (tiny_llama, "LlamaForCausalLM"), "gpt2": (tiny_gpt2, "GPT2LMHeadModel"),
            "t5": (tiny_t5, "T5ForConditionalGeneration")}


def interop_inputs(kind: str) -> dict:
    return {"input_ids": TOKENS, "decoder_input_ids": TOKENS[:, :4]} if kind == "t5" else {"input_ids": TOKENS}


def interop_logits(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**interop_inputs(kind)).logits


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    from tests.upstream_harness import UpstreamUnavailable, ensure_upstream_peft, run_upstream

    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    root = tmp_path_factory.mktemp("trainable_tokens_interop")
    cases, ours = {}, {}
    for seed, (name, (kind, config)) in enumerate(INTEROP_CASES.items(), start=1):
        build, model_class = BUILDERS[kind]
        folder = root / name
        build().save_pretrained(folder / "base")
        torch.save(interop_inputs(kind), folder / "inputs.pt")
        model = get_peft_model(build(), LoraConfig(**config))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.requires_grad:
                    param.add_(0.5 * torch.randn(param.shape, generator=gen))
        ours[name] = interop_logits(model, kind)
        model.save_pretrained(str(folder / "ours"))
        cases[name] = {"model_class": model_class, "base_dir": str(folder / "base"), "config": config, "seed": seed,
                       "dir": str(folder), "ours": str(folder / "ours"), "upstream": str(folder / "upstream")}
    (root / "cases.json").write_text(json.dumps(cases))
    report = run_upstream(UPSTREAM_SCRIPT, args=[str(root)], timeout=240).data
    return cases, ours, report


@pytest.mark.upstream
@pytest.mark.parametrize("name", INTEROP_CASES)
def test_our_adapter_gives_the_same_outputs_in_upstream(interop, name):
    cases, ours, _ = interop
    kind = INTEROP_CASES[name][0]
    base = interop_logits(BUILDERS[kind][0](), kind)
    upstream = torch.load(Path(cases[name]["dir"]) / "up_on_ours.pt", weights_only=True)
    assert (ours[name] - base).abs().max() > 1e-2
    torch.testing.assert_close(upstream, ours[name], rtol=0, atol=1e-5)


@pytest.mark.upstream
@pytest.mark.parametrize("name", INTEROP_CASES)
def test_upstream_adapter_gives_the_same_outputs_here(interop, name):
    cases, _, report = interop
    case, kind = cases[name], INTEROP_CASES[name][0]
    expected = torch.load(Path(case["dir"]) / "up_own.pt", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = PeftModel.from_pretrained(BUILDERS[kind][0](), case["upstream"])
    torch.testing.assert_close(interop_logits(model, kind), expected, rtol=0, atol=1e-5)
    tied = kind != "llama"
    assert report[name]["lm_head"] == ("TrainableTokensWrapper" if tied else "Linear")
    assert isinstance(model.get_base_model().lm_head, AuxiliaryTrainingWrapper) == tied
    if kind == "t5":
        assert report[name]["encoder"] == "TrainableTokensWrapper"
        encoder_embedding = model.get_base_model().encoder.embed_tokens
        assert encoder_embedding.tied_to is model.get_base_model().shared


@pytest.mark.upstream
@pytest.mark.parametrize("name", INTEROP_CASES)
def test_saved_keys_and_shapes_are_upstreams(interop, name):
    cases, _, _ = interop
    ours = load_file(os.path.join(cases[name]["ours"], "adapter_model.safetensors"))
    upstream = load_file(os.path.join(cases[name]["upstream"], "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in upstream.items()}
    embedding = {"llama": "model.embed_tokens", "gpt2": "transformer.wte", "t5": "shared"}[INTEROP_CASES[name][0]]
    assert [k for k in ours if "trainable_tokens" in k] == [
        f"base_model.model.{embedding}.token_adapter.trainable_tokens_delta"]
    with open(os.path.join(cases[name]["upstream"], "adapter_config.json")) as f:
        assert json.load(f)["trainable_token_indices"] == INTEROP_CASES[name][1]["trainable_token_indices"]
