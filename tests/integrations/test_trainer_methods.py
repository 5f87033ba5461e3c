"""LoRA-GA and LoRA-Pro inside transformers' `Trainer` (and TRL's `SFTTrainer`) through documented arguments only:
`callbacks=[LoraGACallback()]`, `optimizer_cls_and_kwargs=(LoraProAdamW, {...})`, `optimizers=(...)`."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

import peft.tuners.loraga.estimate as ga_estimate
from peft import LoraConfig, LoraGACallback, LoraGAConfig, LoraProConfig, PeftModel, get_peft_model
from peft.optimizers import LoraProAdamW
from peft.tuners.loraga.model import factor_params
from peft.utils.lora_ga_utils import LoraGAContext, estimate_gradient
from tests.helpers.tiny_models import tiny_llama, token_ids

transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
ITERS, MAX_STEPS, SAVE_STEPS = 2, 4, 2


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = token_ids(n, length, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


IDS = token_ids(2, 8, seed=9)


def _args(output_dir, **extra) -> "transformers.TrainingArguments":
    kwargs = dict(output_dir=str(output_dir), max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
                  per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="linear", weight_decay=0.01,
                  report_to=[], use_cpu=True, seed=11, data_seed=11, logging_steps=1, dataloader_num_workers=0,
                  disable_tqdm=True)
    return transformers.TrainingArguments(**{**kwargs, **extra})


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=IDS).logits
    model.train(was_training)
    return out


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- LoRA-GA: LoraGACallback ------------------------------------------------------------------------------------------
def _loraga_config(**extra) -> LoraGAConfig:
    return LoraGAConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, use_rslora=True, iters=ITERS,
                        target_modules=TARGETS, **extra)


def _loraga_model(**extra):
    with pytest.warns(UserWarning, match="No LoraGAContext"):  # default init now, LoraGACallback initialises later
        return get_peft_model(tiny_llama(), _loraga_config(**extra))


class Probe(transformers.TrainerCallback):
    """After LoraGACallback: the model at on_train_begin, the input_ids of every training forward, and the logits
    of the model at each checkpoint."""

    def __init__(self) -> None:
        self.begin, self.trained_ids, self.at_save, self._hook = None, [], {}, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin = {"state": _state(model), "logits": _logits(model)}
        self._hook = model.get_base_model().register_forward_pre_hook(
            lambda _, a, kw: self.trained_ids.append(kw["input_ids"].clone()), with_kwargs=True)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.at_save[state.global_step] = _logits(model)

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()


@pytest.fixture
def recorded_estimation(monkeypatch):
    """The batches `estimate_gradient` reads when LoraGACallback calls it."""
    seen, real = [], ga_estimate.estimate_gradient

    def recording(model, dataloader, **kwargs):
        def batches():
            for batch in dataloader:
                seen.append({k: v.clone() for k, v in batch.items()})
                yield batch

        return real(model, batches(), **kwargs)

    monkeypatch.setattr(ga_estimate, "estimate_gradient", recording)  # where LoraGACallback looks it up
    return seen


def _train_with_callback(output_dir, model=None, **extra):
    model = _loraga_model() if model is None else model
    probe = Probe()
    trainer = transformers.Trainer(model=model, args=_args(output_dir, **extra), train_dataset=RandomTokens(),
                                   callbacks=[LoraGACallback(), probe])
    return trainer, probe


@pytest.fixture(scope="module")
def ga_run(tmp_path_factory):
    """One run of MAX_STEPS steps with LoraGACallback and checkpoints every SAVE_STEPS steps, then save_model."""
    out = tmp_path_factory.mktemp("loraga_trainer")
    trainer, probe = _train_with_callback(out)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return {"out": out, "trainer": trainer, "probe": probe, "final": _state(trainer.model),
            "logits": _logits(trainer.model), "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def test_checkpoint_of_a_model_built_in_lora_ga_context_reloads_on_the_original_base(tmp_path):
    """The documented flow before the callback (LoraGAContext + get_peft_model, then the Trainer): its checkpoints
    used to hold the rank-r adapter of the offset base, which reloaded on the original base with logits 0.24 off
    (and a warning that said it was right); now they hold the rank-2r plain LoRA."""
    base = tiny_llama()
    data = RandomTokens()
    batches = [data[i] for i in range(4)]
    batches = [{k: torch.stack([b[k] for b in batches[i:i + 2]]) for k in batches[0]} for i in (0, 2)]
    with LoraGAContext(model=base, named_grad=estimate_gradient(base, batches)):
        model = get_peft_model(base, _loraga_config())
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_steps=SAVE_STEPS), train_dataset=data)
    trainer.train()
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / f"checkpoint-{SAVE_STEPS}"))
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)


def test_callback_init_equals_the_plain_flow_on_the_same_batches(tmp_path, recorded_estimation):
    trainer, probe = _train_with_callback(tmp_path, max_steps=1, save_strategy="no")
    trainer.train()
    assert len(recorded_estimation) == ITERS
    base = tiny_llama()
    named_grad = estimate_gradient(base, recorded_estimation, peft_config=_loraga_config())
    with LoraGAContext(model=base, named_grad=named_grad):
        plain = get_peft_model(base, _loraga_config())
    expected = plain.state_dict()
    assert probe.begin["state"].keys() == expected.keys()
    for key, value in probe.begin["state"].items():  # A, B and the offset base weights
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7, msg=key)
    # the estimation batches are the first training batches (the callback put the RNG back)
    for estimated, trained in zip(recorded_estimation, probe.trained_ids):
        assert torch.equal(estimated["input_ids"], trained)


def test_callback_keeps_the_output_at_init(ga_run):
    begin = ga_run["probe"].begin
    assert any(".lora_B." in k and torch.count_nonzero(v) for k, v in begin["state"].items()), "B was not set"
    torch.testing.assert_close(begin["logits"], _logits(tiny_llama()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seedable", [True, False])
def test_callback_leaves_the_data_order_alone(tmp_path, seedable):
    """With the callback the training batches are those of the same run without it (whether the sampler is
    seeded per epoch or draws its seed from the global RNG)."""
    extra = dict(max_steps=3, save_strategy="no", accelerator_config={"use_seedable_sampler": seedable})
    with_cb, probe = _train_with_callback(tmp_path / "with", **extra)
    with_cb.train()
    model, without = _loraga_model(), Probe()
    transformers.Trainer(model=model, args=_args(tmp_path / "without", **extra), train_dataset=RandomTokens(),
                         callbacks=[without]).train()
    assert len(probe.trained_ids) == len(without.trained_ids) == 3
    for a, b in zip(probe.trained_ids, without.trained_ids):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", [f"checkpoint-{SAVE_STEPS}", f"checkpoint-{MAX_STEPS}", "final"])
def test_checkpoints_reload_on_the_original_base(ga_run, where):
    folder = ga_run["out"] / where
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4  # the plain rank-2r LoRA
    step = MAX_STEPS if where == "final" else int(where.split("-")[1])
    expected = ga_run["logits"] if where == "final" else ga_run["probe"].at_save[step]
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(folder))  # the ORIGINAL base weights
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    if step == SAVE_STEPS:  # checkpoint-2 is not the final model: the comparison can tell them apart
        assert (expected - ga_run["logits"]).abs().max() > 1e-4


@pytest.mark.parametrize("with_callback", [True, False])
def test_resume_matches_the_uninterrupted_run(ga_run, tmp_path, with_callback):
    """Trainer's resume loads the rank-2r checkpoint into a fresh LoRA-GA model: A, B, the offset base and the
    optimizer state come back bit for bit, the callback sees an initialised adapter and leaves it."""
    model = _loraga_model()
    callbacks = [LoraGACallback()] if with_callback else []
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=RandomTokens(),
                                   callbacks=callbacks)
    trainer.train(resume_from_checkpoint=str(ga_run["out"] / f"checkpoint-{SAVE_STEPS}"))
    assert trainer.state.global_step == MAX_STEPS
    resumed = _state(model)
    for key, value in ga_run["final"].items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == pytest.approx(ga_run["losses"], abs=1e-6)


def test_resume_without_initial_factors_is_a_clear_error(tmp_path):
    """A checkpoint of a run that never initialised LoRA-GA holds no A0, B0: the callback refuses to re-initialise
    (that would throw the trained weights away)."""
    model = _loraga_model()
    transformers.Trainer(model=model, args=_args(tmp_path, max_steps=SAVE_STEPS), train_dataset=RandomTokens()).train()
    trainer, _ = _train_with_callback(tmp_path / "resumed")
    with pytest.raises(ValueError, match="has no initial factors"):
        trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE_STEPS}"))


def test_callback_refuses_loaded_weights_and_other_models(tmp_path):
    model = _loraga_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        factor_params(layer, "default")[1].fill_(0.1)
    trainer, _ = _train_with_callback(tmp_path, model=model)
    with pytest.raises(ValueError, match="nonzero B"):
        trainer.train()
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="LoraGACallback trains a LoRA-GA model"):
        LoraGACallback().on_train_begin(None, None, None, model=lora, train_dataloader=[])


@pytest.mark.parametrize("how", ["peft_model", "peft_config"])
def test_sft_trainer_takes_the_callback(tmp_path, how):
    """TRL's SFTTrainer: the PeftModel as `model`, or the base model and `peft_config=LoraGAConfig(...)` (SFTTrainer
    then calls get_peft_model itself, with no gradients waiting)."""
    trl, datasets = pytest.importorskip("trl"), pytest.importorskip("datasets")
    rows = [{"input_ids": r.tolist()} for r in token_ids(8, 10, seed=5, low=3)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, seed=3,
                         dataloader_num_workers=0, dataset_kwargs={"skip_prepare_dataset": True}, bf16=False)
    model = {"model": _loraga_model()} if how == "peft_model" else {"model": tiny_llama(),
                                                                     "peft_config": _loraga_config()}
    probe = Probe()
    with pytest.warns(UserWarning, match="No LoraGAContext") if how == "peft_config" else contextlib.nullcontext():
        trainer = trl.SFTTrainer(**model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=_word_tokenizer(), callbacks=[LoraGACallback(), probe])
    trainer.train()
    torch.testing.assert_close(probe.begin["logits"], _logits(tiny_llama()), rtol=0, atol=1e-5)
    assert any(".lora_B." in k and torch.count_nonzero(v) for k, v in probe.begin["state"].items())
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "checkpoint-2"))
    torch.testing.assert_close(_logits(reloaded), _logits(trainer.model), rtol=0, atol=1e-5)


def _word_tokenizer():
    """Offline tokenizer for the tiny model's 64 ids: <pad>, <eos>, <unk>, then "w3" ... "w63"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, 64)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


# --- LoRA-Pro: the optimizer by class ------------------------------------------------------------------------------
def _lorapro_model(mode: str):
    return get_peft_model(tiny_llama(), LoraProConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, mode=mode,
                                                      target_modules=TARGETS))


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_by_class_steps_like_the_optimizer_instance(tmp_path, mode):
    """`optimizer_cls_and_kwargs=(LoraProAdamW, kwargs)`: the Trainer builds it from its decay / no-decay param
    groups (weight decay from TrainingArguments, lr from kwargs); every step equals `optimizers=(LoraProAdamW(model,
    ...), None)` on the same data."""
    runs = {}
    for how in ("class", "instance"):
        model = _lorapro_model(mode)
        extra = {"optimizer_cls_and_kwargs": (LoraProAdamW, {"lr": 1e-2})} if how == "class" else \
            {"optimizers": (LoraProAdamW(model, lr=1e-2, weight_decay=0.01), None)}
        trainer = transformers.Trainer(model=model, args=_args(tmp_path / how, save_strategy="no"),
                                       train_dataset=RandomTokens(), **extra)
        trainer.train()
        runs[how] = (_state(model), trainer)
    optimizer = runs["class"][1].optimizer.optimizer  # the AcceleratedOptimizer wraps it
    assert isinstance(optimizer, LoraProAdamW) and len(optimizer.pairs) == len(TARGETS) * 2  # 2 layers each
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert {st["step"] for st in optimizer.state.values()} == {MAX_STEPS}
    init = _state(_lorapro_model(mode))
    for key, value in runs["class"][0].items():
        torch.testing.assert_close(value, runs["instance"][0][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(v, init[k]) for k, v in runs["class"][0].items() if ".lora_B." in k)


# --- the docs' Trainer snippets run as written --------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("page", ["loraga.md", "lorapro.md"])
def test_docs_trainer_snippet_runs(page, tmp_path, monkeypatch):
    text = (DOCS / page).read_text()
    section = text[text.index("## With transformers' Trainer"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    expected = pytest.warns(UserWarning, match="No LoraGAContext") if page == "loraga.md" else contextlib.nullcontext()
    with expected:
        exec(compile(block, f"{page} Trainer snippet", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 4
    if page == "loraga.md":
        assert (tmp_path / "loraga_run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
        torch.testing.assert_close(_logits(namespace["reloaded"]), _logits(namespace["model"]), rtol=0, atol=1e-5)
