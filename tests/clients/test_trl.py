"""TRL with this package: every trainer module imports, and `SFTTrainer` trains LoRA, LoRA-Pro
and LoRA-GA models on a tiny offline Llama, writing checkpoints that reload to the trained model's logits.

trl and datasets are test dependencies (setup.py's "test" extra): a missing one fails here, it is not skipped.
Everything is offline: the model comes from `tests.helpers.tiny_models`, the tokenizer is a word-level
`tokenizers` vocabulary of the model's 64 ids, and the dataset is built in memory.
"""

from __future__ import annotations

import importlib
import json
import pkgutil

import datasets
import pytest
import torch
import trl

import peft
from peft import (
    LoraConfig,
    LoraGAConfig,
    LoraProConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from peft.optimizers import LoraProAdamW
from peft.utils.lora_ga_utils import (
    LoraGAContext,
    estimate_gradient,
    save_loraga_model_final,
    save_loraga_model_init,
)
from tests.helpers.tiny_models import VOCAB, tiny_llama, token_ids

TARGETS = ["q_proj", "v_proj"]
SPECIALS = ["<pad>", "<eos>", "<unk>"]
MAX_STEPS = 2


# --- every trainer module imports --------------------------------------------------------------------------------
def _trl_modules() -> list[str]:
    names = []
    for package in ("trl.trainer", "trl.experimental"):
        module = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, f"{package}.", onerror=lambda _: None)]
    return names


def _missing_dependency(exc: BaseException) -> str | None:
    """The module named by a `ModuleNotFoundError` at the root of `exc` (TRL's lazy modules wrap it in a
    RuntimeError), unless peft is involved; else None."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    if isinstance(exc, ModuleNotFoundError) and exc.name and "peft" not in f"{exc.name} {exc}":
        return exc.name
    return None


@pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")
def test_every_trl_trainer_module_imports():
    """TRL imports `PrefixTuningConfig`, `PromptLearningConfig`, `BaseTunerLayer`, ... from peft at module level.
    Only a missing optional dependency of TRL's own (not peft) may stop a module."""
    names = _trl_modules()
    assert "trl.trainer.sft_trainer" in names and len(names) > 50
    failures, skipped = {}, {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001  (collect every failure, report them together)
            missing = _missing_dependency(exc)
            if missing is None:
                failures[name] = repr(exc)
            else:
                skipped[name] = missing
    assert not failures, failures
    # trl 1.16 here: only trl.experimental.async_grpo.openenv_harness (needs `openenv`)
    assert len(skipped) <= 3, skipped


def test_trl_sees_this_packages_prompt_learning_classes():
    from trl.trainer import grpo_trainer, sft_trainer

    assert sft_trainer.PrefixTuningConfig is grpo_trainer.PrefixTuningConfig is peft.PrefixTuningConfig
    assert sft_trainer.PeftModel is PeftModel and sft_trainer.PeftConfig is PeftConfig


# --- SFTTrainer set-up --------------------------------------------------------------------------------------------
def _tokenizer():
    """Word-level tokenizer: ids 0-2 are <pad>, <eos>, <unk>; "w3" ... "w63" are ids 3 ... 63."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIALS + [f"w{i}" for i in range(len(SPECIALS), VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _texts(n: int = 8, length: int = 10) -> list[str]:
    ids = token_ids(n, length, seed=5, low=len(SPECIALS))
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def _dataset():
    return datasets.Dataset.from_dict({"text": _texts()})


def _args(output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_steps=MAX_STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2, max_length=16, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=3,
        # SFTConfig defaults to bf16=True: accelerate then patches the model instance's forward to run under bf16
        # autocast, so the trained model's logits would differ from a float32 reload by ~1e-3. Train in float32.
        bf16=False,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def _sft(model, output_dir, **kwargs):
    return trl.SFTTrainer(model=model, args=_args(output_dir), train_dataset=_dataset(), processing_class=_tokenizer(),
                          **kwargs)


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _assert_changed(before: dict, after: dict) -> None:
    assert before.keys() == after.keys() and before
    assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the adapter"


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    model.eval()
    ids = token_ids(2, 8, seed=9, low=len(SPECIALS))
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _checkpoint(output_dir) -> str:
    folder = output_dir / f"checkpoint-{MAX_STEPS}"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    return str(folder)


# --- SFTTrainer with each tuner type ------------------------------------------------------------------------------
def test_sft_trainer_lora_peft_config(tmp_path):
    trainer = _sft(tiny_llama(), tmp_path, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, PeftModel)
    before = _adapter_state(trainer.model)
    trainer.train()
    _assert_changed(before, _adapter_state(trainer.model))

    reloaded = PeftModel.from_pretrained(tiny_llama(), _checkpoint(tmp_path))
    assert reloaded.peft_config["default"].peft_type == peft.PeftType.LORA
    torch.testing.assert_close(_logits(reloaded), _logits(trainer.model), rtol=0, atol=1e-5)


def test_sft_trainer_lorapro_with_its_optimizer(tmp_path):
    """LoraProAdamW needs the PeftModel, so build it with get_peft_model and pass it as `model` (TRL refuses a
    PeftModel together with `peft_config`); the optimizer goes in `optimizers=(optimizer, None)`."""
    model = get_peft_model(tiny_llama(), LoraProConfig(r=4, lora_alpha=8, target_modules=TARGETS, mode="full",
                                                       task_type="CAUSAL_LM"))
    optimizer = LoraProAdamW(model, lr=1e-2)
    trainer = _sft(model, tmp_path, optimizers=(optimizer, None))
    before = _adapter_state(model)
    trainer.train()
    _assert_changed(before, _adapter_state(model))
    assert trainer.optimizer.optimizer is optimizer and optimizer.state, "the trainer did not step LoraProAdamW"

    reloaded = PeftModel.from_pretrained(tiny_llama(), _checkpoint(tmp_path))
    assert reloaded.peft_config["default"].peft_type == peft.PeftType.LORAPRO
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)


def test_sft_trainer_loraga_model_final_save_loads_on_original_base(tmp_path):
    base = tiny_llama()
    ids = token_ids(8, 10, seed=5, low=len(SPECIALS))
    batches = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in (0, 4)]
    named_grad = estimate_gradient(model=base, dataloader=batches, accelerator=None, quant_flag=False)
    config = LoraGAConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=TARGETS, iters=2, task_type="CAUSAL_LM")
    with LoraGAContext(model=base, named_grad=named_grad):
        model = get_peft_model(model=base, peft_config=config, adapter_name="default")
    save_loraga_model_init(model, save_dir=str(tmp_path / "final"))  # A0, B0: the final save needs them
    trainer = _sft(model, tmp_path / "run")
    before = _adapter_state(model)
    trainer.train()
    _assert_changed(before, _adapter_state(model))

    save_loraga_model_final(model, save_dir=str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "final"))  # the ORIGINAL (not offset) base
    assert reloaded.peft_config["default"].r == 2 * config.r
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-4)


# --- prompt learning: configs only ---------------------------------------------------------------------------------
PROMPT_CONFIGS = {
    "prefix tuning": lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", prefix_projection=True,
                                                encoder_hidden_size=8),
    "prompt tuning": lambda: PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM",
                                                prompt_tuning_init="SAMPLE_VOCAB"),
    "P-tuning": lambda: PromptEncoderConfig(num_virtual_tokens=4, task_type="CAUSAL_LM", encoder_hidden_size=8,
                                            encoder_reparameterization_type="LSTM"),
}


@pytest.mark.parametrize("method", list(PROMPT_CONFIGS))
def test_sft_trainer_refuses_prompt_learning_and_leaves_model_alone(tmp_path, method):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(NotImplementedError, match=f"{method} .* prompt-learning method"):
        _sft(model, tmp_path, peft_config=PROMPT_CONFIGS[method]())
    assert [type(m) for m in model.modules()] == modules and not hasattr(model, "peft_config")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", list(PROMPT_CONFIGS))
def test_prompt_learning_config_json_round_trip(tmp_path, method):
    config = PROMPT_CONFIGS[method]()
    assert config.is_prompt_learning and isinstance(config, peft.PromptLearningConfig)
    config.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == config.peft_type.value and data["num_virtual_tokens"] == 4
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is type(config) and loaded == config and loaded.to_dict() == config.to_dict()
