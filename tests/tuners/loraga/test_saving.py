"""The final LoRA-GA adapter is a plain rank-2r LoRA that reproduces the trained model on the ORIGINAL base, in
this package and in upstream PEFT 0.21.2; the model in memory stays usable after the final save."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from peft import LoraGAConfig, PeftModel, get_peft_model
from peft.utils.lora_ga_utils import (
    INIT_SUBFOLDER,
    LoraGAContext,
    estimate_gradient,
    save_loraga_model_final,
    save_loraga_model_init,
)
from tests.tuners.loraga.helpers import assert_same_adapter_files, llama, token_batches
from tests.upstream_harness import UpstreamUnavailable, run_upstream

CASES = {
    "rslora_patterns": (dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4, use_rslora=True,
                             rank_pattern={"down_proj": 3}, alpha_pattern={"q_proj": 6}), "ga"),
    "embedding_head": (dict(target_modules=["embed_tokens", "q_proj", "lm_head"], r=2, lora_alpha=4), "default"),
}

UPSTREAM_SCRIPT = """
import json, sys, torch
from transformers import LlamaForCausalLM
from peft import PeftModel
work = sys.argv[1]
ids = torch.load(f"{work}/ids.pt", weights_only=True)
out = {}
for case in json.load(open(f"{work}/cases.json")):
    base = LlamaForCausalLM.from_pretrained(f"{work}/base", dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, f"{work}/{case}").eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, f"{work}/{case}_upstream.pt")
    out[case] = type(model.peft_config["default"]).__name__
emit(out)
"""


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(model, batches, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """Each case: estimate, init, save init, train, save final. Returns the work folder and per-case facts."""
    work = tmp_path_factory.mktemp("loraga_final")
    llama().save_pretrained(work / "base")
    batches, ids = token_batches(3), token_batches(1, seed=9)[0]["input_ids"]
    torch.save(ids, work / "ids.pt")
    facts = {}
    for case, (kwargs, adapter) in CASES.items():
        model = llama()
        original = _logits(model, ids)
        grads = estimate_gradient(model, batches)
        with LoraGAContext(model=model, named_grad=grads):
            peft_model = get_peft_model(model, LoraGAConfig(**kwargs), adapter_name=adapter)
        save_loraga_model_init(peft_model, save_dir=str(work / case))
        _train(peft_model, batches)
        trained = _logits(peft_model, ids)
        state = {k: v.clone() for k, v in peft_model.state_dict().items()}
        save_loraga_model_final(peft_model, save_dir=str(work / case))
        facts[case] = dict(model=peft_model, original=original, trained=trained, state=state, kwargs=kwargs)
    (work / "cases.json").write_text(json.dumps(list(CASES)))
    return work, ids, facts


@pytest.mark.parametrize("case", list(CASES))
def test_final_config_is_plain_lora_rank_2r(flows, case):
    work, _, facts = flows
    config = json.loads((work / case / "adapter_config.json").read_text())
    kwargs = facts[case]["kwargs"]
    assert config["peft_type"] == "LORA" and config["init_lora_weights"] is True
    assert config["r"] == 2 * kwargs["r"]
    factor = math.sqrt(2) if kwargs.get("use_rslora") else 2
    assert config["lora_alpha"] == pytest.approx(factor * kwargs["lora_alpha"])
    assert config["rank_pattern"] == {k: 2 * v for k, v in kwargs.get("rank_pattern", {}).items()}
    assert config["alpha_pattern"] == pytest.approx({k: factor * v for k, v in kwargs.get("alpha_pattern", {}).items()})
    assert not any(k in config for k in ("direction", "bsz", "stable_gamma"))
    assert os.path.isdir(work / case / INIT_SUBFOLDER)


@pytest.mark.parametrize("case", list(CASES))
def test_final_adapter_reproduces_trained_model_here(flows, case):
    work, ids, facts = flows
    trained, original = facts[case]["trained"], facts[case]["original"]
    assert (trained - original).abs().max() > 1e-3  # training moved the model
    reloaded = PeftModel.from_pretrained(llama(), str(work / case))
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.upstream
def test_final_adapter_reproduces_trained_model_in_upstream(flows):
    work, _, facts = flows
    try:
        result = run_upstream(UPSTREAM_SCRIPT, args=[str(work)])
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    assert result.data == {case: "LoraConfig" for case in CASES}
    for case in CASES:
        got = torch.load(work / f"{case}_upstream.pt", weights_only=True)
        torch.testing.assert_close(got, facts[case]["trained"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_model_in_memory_untouched_and_still_trains(flows, case):
    _, ids, facts = flows
    model = facts[case]["model"]
    for key, value in model.state_dict().items():  # no second offset, adapter not deleted
        torch.testing.assert_close(value, facts[case]["state"][key], rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), facts[case]["trained"], rtol=0, atol=0)
    _train(model, token_batches(1), steps=1)
    assert (_logits(model, ids) - facts[case]["trained"]).abs().max() > 0


def _initialised(grad_seed: int = 0, lora_alpha: float = 4, **kwargs):
    model = llama()
    grads = estimate_gradient(model, token_batches(2, seed=grad_seed))
    with LoraGAContext(model=model, named_grad=grads):
        return get_peft_model(model, LoraGAConfig(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=lora_alpha,
                                                  **kwargs))


def _fresh(**kwargs):
    """The same LoRA-GA config built with no gradients waiting: LoRA's default init on the ORIGINAL base."""
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        return get_peft_model(llama(), LoraGAConfig(target_modules=["q_proj", "down_proj"], r=2, lora_alpha=4,
                                                    **kwargs))


def test_final_of_an_adapter_never_initialised_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_loraga_model_init"):
        save_loraga_model_final(_fresh(), save_dir=str(tmp_path))


def test_final_without_init_folder_uses_the_recorded_init(tmp_path):
    """No `save_loraga_model_init`: the tuner's record of A0, B0 gives the same files as the folder would."""
    peft_model = _initialised()
    save_loraga_model_init(peft_model, save_dir=str(tmp_path / "with_folder"))
    _train(peft_model, token_batches(2))
    save_loraga_model_final(peft_model, save_dir=str(tmp_path / "with_folder"))
    save_loraga_model_final(peft_model, save_dir=str(tmp_path / "recorded"))
    assert not os.path.exists(tmp_path / "recorded" / INIT_SUBFOLDER)
    assert_same_adapter_files(tmp_path / "recorded", tmp_path / "with_folder")


@pytest.mark.parametrize("rslora", [False, True])
def test_save_pretrained_writes_the_final_form_for_the_original_base(tmp_path, rslora):
    """An initialised adapter fits only the offset base, so `save_pretrained` (hence every Trainer checkpoint)
    writes the rank-2r plain LoRA that `save_loraga_model_final` writes; it reloads on the original base."""
    ids = token_batches(1, seed=9)[0]["input_ids"]
    peft_model = _initialised(use_rslora=rslora)
    _train(peft_model, token_batches(2))
    trained = _logits(peft_model, ids)
    peft_model.save_pretrained(str(tmp_path / "saved"))
    save_loraga_model_final(peft_model, save_dir=str(tmp_path / "final"))
    assert_same_adapter_files(tmp_path / "saved", tmp_path / "final")
    assert json.loads((tmp_path / "saved" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(llama(), str(tmp_path / "saved"))
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=1e-5, atol=1e-5)


def test_adapter_never_initialised_saves_as_itself(tmp_path):
    _fresh().save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAGA" and config["r"] == 2


def test_load_adapter_into_a_fresh_model_restores_the_run_bit_for_bit(tmp_path):
    """What Trainer's resume does: `load_adapter(folder)` of the rank-2r saved form into a fresh LoRA-GA model (same
    config, original base) splits it back into the trained A, B and the offset base, every tensor bit for bit."""
    peft_model = _initialised()
    _train(peft_model, token_batches(2))
    peft_model.save_pretrained(str(tmp_path))
    fresh = _fresh()
    fresh.load_adapter(str(tmp_path), "default", is_trainable=True)
    expected = peft_model.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert all(p.requires_grad for n, p in fresh.named_parameters() if ".lora_" in n)
    fresh.save_pretrained(str(tmp_path / "again"))  # the restored model knows its init: saves the same files
    assert_same_adapter_files(tmp_path / "again", tmp_path)


def test_load_adapter_of_the_same_run_keeps_the_offset(tmp_path):
    """Trainer's load_best_model_at_end loads a checkpoint of the same run into the trained model."""
    peft_model = _initialised()
    peft_model.save_pretrained(str(tmp_path))
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    _train(peft_model, token_batches(2))
    peft_model.load_adapter(str(tmp_path), "default", is_trainable=True)
    for key, value in peft_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_adapter_of_another_init_is_a_clear_error(tmp_path):
    _initialised(grad_seed=1).save_pretrained(str(tmp_path))
    peft_model = _initialised(grad_seed=0)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    with pytest.raises(ValueError, match="not the ones its base weights were offset with"):
        peft_model.load_adapter(str(tmp_path), "default")
    for key, value in peft_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_load_adapter_with_another_scale_is_a_clear_error(tmp_path):
    _initialised(lora_alpha=8).save_pretrained(str(tmp_path))  # scale 4, the fresh model's is 2
    with pytest.raises(ValueError, match="not this adapter's saved form"):
        _fresh().load_adapter(str(tmp_path), "default")


def test_delete_adapter_forgets_its_init(tmp_path):
    from peft.tuners.loraga.model import init_record

    peft_model = _initialised()
    assert set(init_record(peft_model.base_model)) == {"default"}
    peft_model.base_model.delete_adapter("default")
    assert init_record(peft_model.base_model) == {}
