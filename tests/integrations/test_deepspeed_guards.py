"""What DeepSpeed ZeRO does to LoRA-GA and LoRA-Pro, without DeepSpeed: both refuse instead of training the wrong
thing (the real runs are the slow tests of test_distributed_trainer.py)."""

from __future__ import annotations

import types

import pytest
import torch

from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.optimizers import LoraProAdamW
from tests.helpers.tiny_models import tiny_llama, token_ids


def test_lorapro_refuses_param_groups_that_no_longer_hold_its_factors():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    optimizer = LoraProAdamW(model, lr=1e-2)
    ids = token_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    # ZeRO hands the client optimizer one flat fp32 partition per group in place of the parameters
    flat = torch.nn.Parameter(torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]))
    flat.grad = torch.zeros_like(flat)
    optimizer.param_groups[0]["params"] = [flat]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("how", ["args", "env"])
def test_loraga_callback_refuses_deepspeed(how, monkeypatch):
    from peft import LoraGACallback

    model = get_peft_model(tiny_llama(), LoraGAConfig(r=2, target_modules=["q_proj"], iters=1))
    args = types.SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}} if how == "args" else None)
    if how == "env":
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    state = types.SimpleNamespace(global_step=0)
    with pytest.raises(ValueError, match="DeepSpeed"):
        LoraGACallback().on_train_begin(args, state, None, model=model, train_dataloader=[])
