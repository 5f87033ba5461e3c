"""`LoraProAdamW` through transformers' Trainer (`optimizers=(opt, None)`): gradient accumulation, clipping,
checkpoints with the optimizer state, resume to the same weights, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from peft import LoraProConfig, get_peft_model, get_peft_model_state_dict
from peft.optimizers import LoraProAdamW
from tests.helpers.tiny_models import tiny_llama, token_ids

transformers = pytest.importorskip("transformers")

MAX_STEPS, SAVE_STEPS, ACCUM = 4, 2, 2


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = token_ids(n, length, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _model(mode: str = "full"):
    config = LoraProConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, mode=mode, target_modules=["q_proj", "v_proj"])
    return get_peft_model(tiny_llama(), config)


def _trainer(model, output_dir, **extra) -> "transformers.Trainer":
    kwargs = dict(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_strategy="steps", save_steps=SAVE_STEPS,
        per_device_train_batch_size=2, gradient_accumulation_steps=ACCUM, max_grad_norm=1.0, learning_rate=1e-2,
        lr_scheduler_type="linear", report_to=[], use_cpu=True, seed=11, data_seed=11, logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=False,
    )
    args = transformers.TrainingArguments(**{**kwargs, **extra})
    optimizer = LoraProAdamW(model, lr=1e-2, weight_decay=0.01)
    return transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(), optimizers=(optimizer, None))


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lorapro_full")
    model = _model()
    init = _adapter(model)
    trainer = _trainer(model, out)
    trainer.train()
    return {"out": out, "init": init, "final": _adapter(model), "trainer": trainer}


def test_trainer_steps_once_per_accumulated_batch(full_run):
    trainer = full_run["trainer"]
    assert trainer.state.global_step == MAX_STEPS
    steps = {st["step"] for st in trainer.optimizer.state.values()}
    assert steps == {MAX_STEPS}, "one LoRA-Pro step per optimizer step, not per micro-batch"
    moved = [k for k in full_run["final"] if not torch.equal(full_run["init"][k], full_run["final"][k])]
    assert len(moved) == len(full_run["final"])
    assert all(torch.isfinite(v).all() for v in full_run["final"].values())


def test_accumulated_micro_batches_equal_one_big_batch(full_run, tmp_path):
    """ACCUM micro-batches of 2 (the fixture) end where batches of 2 * ACCUM without accumulation do: the
    adjustment sees the accumulated (and clipped) gradient once per optimizer step."""
    model = _model()
    trainer = _trainer(model, tmp_path, per_device_train_batch_size=2 * ACCUM, gradient_accumulation_steps=1,
                       save_strategy="no")
    trainer.train()
    for key, value in _adapter(model).items():
        torch.testing.assert_close(value, full_run["final"][key], atol=1e-6, rtol=1e-5, msg=key)


def test_checkpoint_holds_the_optimizer_state(full_run):
    ckpt = full_run["out"] / f"checkpoint-{SAVE_STEPS}"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = [v for st in state["state"].values() for k, v in st.items() if k == "exp_avg"]
    shapes = ((16, 16), (8, 16))  # full mode: (out, in) of q_proj, v_proj
    assert moments and all(m.dtype == torch.float32 and tuple(m.shape) in shapes for m in moments)


def test_resume_matches_uninterrupted_run(full_run, tmp_path):
    model = _model()
    trainer = _trainer(model, tmp_path)
    trainer.train(resume_from_checkpoint=str(full_run["out"] / f"checkpoint-{SAVE_STEPS}"))
    assert trainer.state.global_step == MAX_STEPS
    for key, value in _adapter(model).items():
        torch.testing.assert_close(value, full_run["final"][key], atol=1e-6, rtol=0, msg=key)


def test_bf16_autocast_efficient_mode(tmp_path):
    model = _model("efficient")
    trainer = _trainer(model, tmp_path, bf16=True)
    trainer.args.max_steps = 2
    trainer.args.save_strategy = "no"
    trainer.train()
    assert all(torch.isfinite(v).all() for v in _adapter(model).values())


def test_registered_adjustment_on_an_accelerate_prepared_optimizer():
    """`register_lorapro_adjustment` on the `AcceleratedOptimizer` that `accelerator.prepare` returns (it has no step
    hooks of its own) adjusts like on the plain optimizer."""
    import copy

    from accelerate import Accelerator

    from peft.optimizers import register_lorapro_adjustment
    from tests.optimizers.test_lorapro import _backward
    from tests.optimizers.test_lorapro import _model as _small_model

    model = _small_model(init_lora_weights=False)
    twin = copy.deepcopy(model)
    ref = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1)
    register_lorapro_adjustment(ref, twin)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, prepared = Accelerator(cpu=True).prepare(model, sgd)
    assert prepared is not sgd
    handle = register_lorapro_adjustment(prepared, model)
    for mdl, opt in ((model, prepared), (twin, ref)):
        _backward(mdl, 1)
        opt.step()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10, msg=name)
    handle.remove()
