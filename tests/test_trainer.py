"""transformers' Trainer trains a PeftModel, writes adapter-only checkpoints, and resumes to the same weights."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from tests.helpers.tiny_models import tiny_llama, token_ids

transformers = pytest.importorskip("transformers")

MAX_STEPS, SAVE_STEPS = 6, 3


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences; labels are the inputs (causal LM loss)."""

    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = token_ids(n, length, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _peft_model():
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(tiny_llama(), config)


def _trainer(model, output_dir) -> "transformers.Trainer":
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
        per_device_train_batch_size=4, learning_rate=5e-2, lr_scheduler_type="linear", warmup_steps=1,
        logging_steps=1, report_to=[], use_cpu=True, seed=11, data_seed=11, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=RandomTokens())


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of MAX_STEPS steps with checkpoints every SAVE_STEPS steps."""
    out = tmp_path_factory.mktemp("full")
    model = _peft_model()
    init = _adapter_state(model)
    trainer = _trainer(model, out)
    result = trainer.train()
    return {"out": out, "init": init, "final": _adapter_state(model), "loss": result.training_loss,
            "history": trainer.state.log_history, "model": model}


def test_trainer_trains_only_the_adapter(full_run):
    init, final = full_run["init"], full_run["final"]
    assert init.keys() == final.keys()
    assert all(".lora_" in k for k in final)
    moved = [k for k in final if not torch.equal(init[k], final[k])]
    assert len(moved) == len(final), "every LoRA factor must move (B from zero, A through B's gradient)"
    assert torch.isfinite(torch.tensor(full_run["loss"]))
    base = {n: p for n, p in full_run["model"].named_parameters() if ".lora_" not in n}
    fresh = dict(tiny_llama().named_parameters())
    for name, param in base.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(param, fresh[key]), f"base parameter {key} changed during training"


def test_checkpoints_are_adapter_only(full_run):
    for step in (SAVE_STEPS, MAX_STEPS):
        ckpt = full_run["out"] / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        config = json.loads((ckpt / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    from safetensors.torch import load_file

    saved = load_file(full_run["out"] / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors")
    assert saved.keys() == full_run["final"].keys()
    for key, value in saved.items():
        assert torch.equal(value, full_run["final"][key])


def test_checkpoint_loads_as_peft_model(full_run):
    ckpt = full_run["out"] / f"checkpoint-{MAX_STEPS}"
    loaded = PeftModel.from_pretrained(tiny_llama(), ckpt)
    ids = token_ids(2, 8)
    full_run["model"].eval()
    with torch.no_grad():
        expected = full_run["model"](input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_resume_from_checkpoint_matches_uninterrupted_run(full_run, tmp_path):
    model = _peft_model()
    trainer = _trainer(model, tmp_path)
    trainer.train(resume_from_checkpoint=str(full_run["out"] / f"checkpoint-{SAVE_STEPS}"))
    assert trainer.state.global_step == MAX_STEPS
    resumed = _adapter_state(model)
    assert resumed.keys() == full_run["final"].keys()
    for key, value in resumed.items():
        torch.testing.assert_close(value, full_run["final"][key], atol=1e-6, rtol=0, msg=key)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    full_losses = [h["loss"] for h in full_run["history"] if "loss" in h]
    assert len(losses) == len(full_losses) == MAX_STEPS  # the resumed history starts with the checkpoint's
    assert losses == pytest.approx(full_losses, abs=1e-5)
