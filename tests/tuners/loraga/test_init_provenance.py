"""An init folder says what it belongs to (`loraga_init.json`: adapter name, shapes, fingerprints of A0, B0), and
`save_loraga_model_final` refuses one from another adapter, another run, other shapes, or with replaced weights,
naming what differs, instead of writing an adapter that loads and gives wrong outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from peft import LoraConfig, LoraGAConfig, PeftModel, get_peft_model, preprocess_loraga
from peft.tuners.loraga.provenance import RECORD_FILE, fingerprint
from peft.utils.lora_ga_utils import (
    INIT_SUBFOLDER,
    LoraGAContext,
    estimate_gradient,
    save_loraga_model_final,
    save_loraga_model_init,
)
from peft.utils.save_and_load import load_peft_weights
from tests.tuners.loraga.helpers import assert_same_adapter_files, llama, token_batches

TARGETS = ["q_proj", "down_proj"]


def _initialised(grad_seed: int = 0, spelling: str = "ours", r: int = 2, adapter_name: str = "default"):
    """A tiny Llama with a LoRA-GA adapter initialised from the gradients of batches drawn with `grad_seed`."""
    model, batches = llama(), token_batches(2, seed=grad_seed)
    if spelling == "upstream":
        config = LoraConfig(target_modules=TARGETS, r=r, lora_alpha=4, init_lora_weights="lora_ga")

        def train_step():
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        return get_peft_model(model, config, adapter_name=adapter_name)
    with LoraGAContext(model=model, named_grad=estimate_gradient(model, batches)):
        return get_peft_model(model, LoraGAConfig(target_modules=TARGETS, r=r, lora_alpha=4),
                              adapter_name=adapter_name)


def _train(model, steps: int = 2) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for batch in token_batches(steps, seed=5):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_init_folder_records_adapter_shapes_and_fingerprints(tmp_path):
    peft_model = _initialised(adapter_name="ga")
    folder = save_loraga_model_init(peft_model, save_dir=str(tmp_path), adapter_name="ga")
    record = json.loads((tmp_path / INIT_SUBFOLDER / RECORD_FILE).read_text())
    weights = load_peft_weights(folder)
    assert record["adapter_name"] == "ga"
    assert sorted(record["tensors"]) == sorted(weights)  # the factors: 2 layers x 2 blocks x (A, B)
    assert len(weights) == 8
    for key, value in weights.items():
        assert record["tensors"][key] == {"shape": list(value.shape), "dtype": "float32",
                                          "sha256": fingerprint(value)}


def test_init_folder_of_another_adapter_is_refused(tmp_path):
    """Two LoRA-GA adapters with the same shapes: the init of 'a' must not serve as the init of 'b'."""
    peft_model = _initialised(adapter_name="a")
    with LoraGAContext(model=peft_model, named_grad=estimate_gradient(peft_model, token_batches(2, seed=3))):
        peft_model.add_adapter("b", LoraGAConfig(target_modules=TARGETS, r=2, lora_alpha=4))
    save_loraga_model_init(peft_model, save_dir=str(tmp_path), adapter_name="a")
    _train(peft_model)
    with pytest.raises(ValueError, match=r"initial factors of adapter 'a', but adapter 'b' is being saved"):
        save_loraga_model_final(peft_model, save_dir=str(tmp_path), adapter_name="b")
    assert not (tmp_path / "adapter_model.safetensors").exists()
    save_loraga_model_final(peft_model, save_dir=str(tmp_path), adapter_name="a")  # its own adapter: fine


@pytest.mark.parametrize("spelling", ["ours", "upstream"])
def test_init_folder_of_another_run_is_refused(tmp_path, spelling):
    """Same config and shapes, gradients from other batches: the other run's A0, B0 differ from the ones this
    model's base was offset with (the tuner's fingerprints), so the final adapter would be wrong."""
    save_loraga_model_init(_initialised(grad_seed=1, spelling=spelling), save_dir=str(tmp_path))
    peft_model = _initialised(grad_seed=0, spelling=spelling)
    _train(peft_model)
    with pytest.raises(ValueError, match=r"differ from the ones adapter 'default' was initialised with in this model"):
        save_loraga_model_final(peft_model, save_dir=str(tmp_path))
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_init_folder_of_another_run_without_record_file_is_refused(tmp_path):
    """A folder written before `loraga_init.json` existed is still checked against the model's own record."""
    save_loraga_model_init(_initialised(grad_seed=1), save_dir=str(tmp_path))
    (tmp_path / INIT_SUBFOLDER / RECORD_FILE).unlink(missing_ok=True)  # (absent before this file existed)
    peft_model = _initialised(grad_seed=0)
    with pytest.raises(ValueError, match="differ from the ones adapter 'default' was initialised with"):
        save_loraga_model_final(peft_model, save_dir=str(tmp_path))


def test_init_folder_with_other_shapes_is_refused(tmp_path):
    save_loraga_model_init(_initialised(r=2), save_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight' is \(2, 16\) there, \(3, 16\) in the adapter"):
        save_loraga_model_final(_initialised(r=3), save_dir=str(tmp_path))


def test_replaced_weights_are_refused(tmp_path):
    """The folder's JSON describes the weights it was written with; weights copied in from another run are caught
    even when the model keeps no record (loaded into a fresh process: here, a record-less adapter)."""
    save_loraga_model_init(_initialised(grad_seed=1), save_dir=str(tmp_path / "other"))
    peft_model = _initialised(grad_seed=0)
    save_loraga_model_init(peft_model, save_dir=str(tmp_path))
    shutil.copy(tmp_path / "other" / INIT_SUBFOLDER / "adapter_model.safetensors",
                tmp_path / INIT_SUBFOLDER / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"are not the ones its {RECORD_FILE} describes"):
        save_loraga_model_final(peft_model, save_dir=str(tmp_path))


@pytest.mark.parametrize("spelling", ["ours", "upstream"])
def test_matching_folder_is_used_and_reloads_on_the_original_base(tmp_path, spelling):
    """The checks pass the folder of the model's own run (with or without its JSON); the final adapter equals the
    one from the model's record and reproduces the trained model on the original base."""
    ids = token_batches(1, seed=9)[0]["input_ids"]
    peft_model = _initialised(spelling=spelling)
    save_loraga_model_init(peft_model, save_dir=str(tmp_path / "run"))
    _train(peft_model)
    trained = _logits(peft_model, ids)
    save_loraga_model_final(peft_model, save_dir=str(tmp_path / "run"))
    reloaded = PeftModel.from_pretrained(llama(), str(tmp_path / "run"))
    torch.testing.assert_close(_logits(reloaded, ids), trained, rtol=1e-5, atol=1e-5)
    shutil.copytree(tmp_path / "run" / INIT_SUBFOLDER, tmp_path / "legacy" / INIT_SUBFOLDER)
    (tmp_path / "legacy" / INIT_SUBFOLDER / RECORD_FILE).unlink(missing_ok=True)
    save_loraga_model_final(peft_model, save_dir=str(tmp_path / "legacy"))
    assert_same_adapter_files(tmp_path / "legacy", tmp_path / "run")
    if spelling == "ours":  # the record alone gives the same files
        save_loraga_model_final(peft_model, save_dir=str(tmp_path / "recorded"))
        assert_same_adapter_files(tmp_path / "recorded", tmp_path / "run")
