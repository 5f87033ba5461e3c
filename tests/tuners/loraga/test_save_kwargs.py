"""Upstream's `save_pretrained` keywords: `path_initial_model_for_weight_conversion` writes the plain rank-2r LoRA
for the ORIGINAL base (the same files as `save_loraga_model_final`, the same tensors as upstream PEFT 0.21.2's own
conversion); `convert_pissa_to_lora` and `save_embedding_layers=True` are refused by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from peft import LoraConfig, LoraGAConfig, LoraProConfig, PeftModel, get_peft_model, preprocess_loraga
from peft.utils.lora_ga_utils import (
    INIT_SUBFOLDER,
    LoraGAContext,
    estimate_gradient,
    save_loraga_model_final,
    save_loraga_model_init,
)
from tests.tuners.loraga.helpers import assert_same_adapter_files, llama, token_batches
from tests.upstream_harness import UpstreamUnavailable, run_upstream

KEY = "path_initial_model_for_weight_conversion"
CONFIG = dict(target_modules=["q_proj", "v_proj", "down_proj"], r=2, lora_alpha=4)
IDS = token_batches(1, seed=9)[0]["input_ids"]


def _initialised(spelling: str, grad_seed: int = 0, **overrides):
    model, batches = llama(), token_batches(2, seed=grad_seed)
    kwargs = {**CONFIG, **overrides}
    if spelling == "upstream":
        config = LoraConfig(init_lora_weights="lora_ga", **kwargs)

        def train_step():
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        return get_peft_model(model, config)
    with LoraGAContext(model=model, named_grad=estimate_gradient(model, batches)):
        return get_peft_model(model, LoraGAConfig(**kwargs))


def _train(model, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for batch in token_batches(steps, seed=5):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _run(tmp_path, spelling: str, **overrides):
    """Init, save the initial adapter both ways (save_pretrained, save_loraga_model_init), train, then the final
    adapter by save_loraga_model_final. Returns the model and its trained logits."""
    peft_model = _initialised(spelling, **overrides)
    peft_model.save_pretrained(str(tmp_path / "init"))
    save_loraga_model_init(peft_model, save_dir=str(tmp_path / "final"))
    _train(peft_model)
    save_loraga_model_final(peft_model, save_dir=str(tmp_path / "final"))
    return peft_model, _logits(peft_model)


@pytest.mark.parametrize("spelling", ["upstream", "ours"])
@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_writes_what_save_loraga_model_final_writes(tmp_path, spelling, rslora):
    peft_model, trained = _run(tmp_path, spelling, use_rslora=rslora)
    init_config = (tmp_path / "init" / "adapter_config.json").read_bytes()
    peft_model.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path / "init")})
    assert_same_adapter_files(tmp_path / "out", tmp_path / "final")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["init_lora_weights"]) == ("LORA", 4, True)
    assert (tmp_path / "init" / "adapter_config.json").read_bytes() == init_config  # the init folder untouched
    reloaded = PeftModel.from_pretrained(llama(), str(tmp_path / "out"))
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    # save_loraga_model_init's folder serves as the initial adapter too
    peft_model.save_pretrained(str(tmp_path / "out2"), **{KEY: str(tmp_path / "final" / INIT_SUBFOLDER)})
    assert_same_adapter_files(tmp_path / "out2", tmp_path / "final")


def test_conversion_in_another_process_from_the_trained_adapter(tmp_path):
    """Upstream's flow across processes: the trained rank-r adapter (upstream spelling: saved as it is, fitting the
    offset base) is loaded onto the original base elsewhere and converted there from the initial adapter."""
    peft_model, trained = _run(tmp_path, "upstream")
    peft_model.save_pretrained(str(tmp_path / "trained"))
    assert json.loads((tmp_path / "trained" / "adapter_config.json").read_text())["r"] == 2
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        elsewhere = PeftModel.from_pretrained(llama(), str(tmp_path / "trained"))
    elsewhere.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path / "init")})
    assert_same_adapter_files(tmp_path / "out", tmp_path / "final")
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(llama(), str(tmp_path / "out"))), trained,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["upstream", "ours"])
def test_conversion_refuses_the_init_of_another_run(tmp_path, spelling):
    _initialised(spelling, grad_seed=1).save_pretrained(str(tmp_path / "other_init"))
    peft_model = _initialised(spelling)
    _train(peft_model)
    with pytest.raises(ValueError, match="differ from the ones adapter 'default' was initialised with"):
        peft_model.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path / "other_init")})
    assert not os.path.exists(tmp_path / "out" / "adapter_model.safetensors")


def test_conversion_without_record_refuses_an_init_of_another_scale(tmp_path):
    """In another process the model keeps no fingerprints; an initial adapter saved with another lora_alpha (its
    base was offset with another scale) is still refused, naming both scales."""
    _initialised("upstream", grad_seed=1, lora_alpha=8).save_pretrained(str(tmp_path / "other_init"))
    peft_model = _initialised("upstream")
    _train(peft_model)
    peft_model.save_pretrained(str(tmp_path / "trained"))
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        elsewhere = PeftModel.from_pretrained(llama(), str(tmp_path / "trained"))
    with pytest.raises(ValueError, match=r"holds a LoRA with scale 4\.0 at .* has scale 2\.0 there"):
        elsewhere.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path / "other_init")})


def test_conversion_of_a_non_default_adapter_reads_its_subfolder(tmp_path):
    peft_model = _initialised("ours")
    with LoraGAContext(model=peft_model, named_grad=estimate_gradient(peft_model, token_batches(2, seed=3))):
        peft_model.add_adapter("second", LoraGAConfig(**CONFIG))
    peft_model.save_pretrained(str(tmp_path / "init"))  # default at init/, second at init/second
    _train(peft_model)
    peft_model.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path / "init")})
    peft_model.save_pretrained(str(tmp_path / "plain"))
    assert_same_adapter_files(tmp_path / "out" / "second", tmp_path / "plain" / "second")
    assert_same_adapter_files(tmp_path / "out", tmp_path / "plain")


def test_conversion_keyword_errors(tmp_path):
    peft_model = _initialised("upstream")
    with pytest.raises(FileNotFoundError, match=f"{KEY}=.*missing.*is not a folder"):
        peft_model.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path / "missing")})
    pro = get_peft_model(llama(), LoraProConfig(target_modules=["q_proj"], r=2))  # a base never offset
    with pytest.raises(ValueError, match=f"{KEY} converts a LoRA adapter.*'default' is a LORAPRO adapter"):
        pro.save_pretrained(str(tmp_path / "out"), **{KEY: str(tmp_path)})
    assert not os.path.exists(tmp_path / "out")


def test_refused_upstream_keywords(tmp_path):
    peft_model = get_peft_model(llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"], r=2))
    with pytest.raises(ValueError, match="convert_pissa_to_lora=.*path_initial_model_for_weight_conversion"):
        peft_model.save_pretrained(str(tmp_path / "a"), convert_pissa_to_lora=str(tmp_path))
    with pytest.raises(ValueError, match="save_embedding_layers=True: this package never writes"):
        peft_model.save_pretrained(str(tmp_path / "a"), save_embedding_layers=True)
    assert not os.path.exists(tmp_path / "a")
    for value in ("auto", False):  # what this package writes anyway
        peft_model.save_pretrained(str(tmp_path / str(value)), save_embedding_layers=value)
        assert_same_adapter_files(tmp_path / str(value), tmp_path / "auto")


UPSTREAM_SCRIPT = """
import json, sys, torch
from transformers import LlamaForCausalLM
from peft import PeftModel
work = sys.argv[1]
out = {}
for case in ("plain", "rslora"):
    base = LlamaForCausalLM.from_pretrained(f"{work}/base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, f"{work}/{case}/trained")
    model.save_pretrained(f"{work}/{case}/upstream_out",
                          path_initial_model_for_weight_conversion=f"{work}/{case}/init_copy")
    config = json.load(open(f"{work}/{case}/upstream_out/adapter_config.json"))
    out[case] = {k: config[k] for k in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")}
emit(out)
"""


@pytest.mark.upstream
def test_conversion_matches_upstreams_own(tmp_path):
    """Upstream PEFT 0.21.2 converts the same trained adapter with the same initial adapter (its own
    `save_pretrained(path_initial_model_for_weight_conversion=...)`): the same tensors and scale as ours."""
    from safetensors.torch import load_file

    for case in ("plain", "rslora"):
        work = tmp_path / case
        peft_model, _ = _run(work, "upstream", use_rslora=case == "rslora")
        peft_model.save_pretrained(str(work / "trained"))
        peft_model.save_pretrained(str(work / "ours"), **{KEY: str(work / "init")})
        shutil.copytree(work / "init", work / "init_copy")  # upstream rewrites the init folder's config
    llama().save_pretrained(tmp_path / "base")
    try:
        result = run_upstream(UPSTREAM_SCRIPT, args=[str(tmp_path)])
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    for case, upstream_config in result.data.items():
        ours_config = json.loads((tmp_path / case / "ours" / "adapter_config.json").read_text())
        assert upstream_config == {k: ours_config[k] for k in upstream_config}, case
        theirs = load_file(tmp_path / case / "upstream_out" / "adapter_model.safetensors")
        ours = load_file(tmp_path / case / "ours" / "adapter_model.safetensors")
        assert sorted(theirs) == sorted(ours), case
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), (case, key)
    assert sorted(result.data) == ["plain", "rslora"]
