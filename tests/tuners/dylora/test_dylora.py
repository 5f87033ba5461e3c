"""DyLoRA: truncated forward / merge against the closed form `s_b B[:, :b] A[:b]` (float64), config validation,
the rank sampler and frozen-mode gradients, and the tuner invariants (init keeps the output, adapter == merged ==
reloaded at the chosen rank, disabled == base, unmerge restores the base)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft import DyLoRAConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.dylora import DyLoRALayer, RankSampler
from peft.tuners.dylora.rank_math import dylora_scale, trained_rows, truncated_apply, truncated_delta


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 6)).double().eval()


def config(**kw) -> DyLoRAConfig:
    kw.setdefault("target_modules", ["0", "2"])
    kw.setdefault("r", 4)
    return DyLoRAConfig(**kw)


X = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# --- math ------------------------------------------------------------------------------------------------------------
def test_truncated_math_closed_form():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 7, dtype=torch.float64, generator=g), torch.randn(5, 4, dtype=torch.float64, generator=g)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g)
    for b in range(1, 5):
        s = dylora_scale(8.0, b, 4)
        assert s == 8.0 / b and dylora_scale(8.0, b, 4, fixed=True) == 2.0
        expected = s * sum(torch.outer(B[:, i], A[i]) for i in range(b))
        torch.testing.assert_close(truncated_delta(A, B, b, s), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(truncated_apply(x, A, B, b, s, lo=b - 1), x @ expected.T, rtol=1e-12, atol=1e-12)


def test_frozen_mode_gradients_reach_only_row_b():
    A = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    lo, hi = trained_rows(3, 1, "frozen")
    assert (lo, hi) == (2, 3) and trained_rows(3, 1, "all") == (0, 3) and trained_rows(2, 2, "frozen") == (0, 2)
    truncated_apply(torch.randn(6, 3, dtype=torch.float64), A, B, 3, 1.0, lo).sum().backward()
    assert torch.count_nonzero(A.grad.abs().sum(1)) == 1 and A.grad[2].abs().sum() > 0
    assert torch.count_nonzero(B.grad.abs().sum(0)) == 1 and B.grad[:, 2].abs().sum() > 0


def test_rank_sampler_one_rank_per_step_uniform():
    sampler = RankSampler(2, 5, seed=0)
    ranks = []
    for _ in range(400):
        first = sampler.rank_for("layer0")
        assert sampler.rank_for("layer1") == first  # same step: same rank
        ranks.append(first)
    counts = torch.bincount(torch.tensor(ranks), minlength=6)
    assert counts[:2].sum() == 0 and all(60 < c < 140 for c in counts[2:])  # 100 expected each
    with pytest.raises(ValueError, match="Invalid r_min=3"):
        RankSampler(3, 2)


@pytest.mark.parametrize("field,value", [("r", 0), ("r_min", 0), ("update_mode", "last"), ("eval_rank", 0),
                                         ("lora_dropout", -0.1), ("bias", "lora_only"), ("fixed_scale", "yes")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        config(**{field: value})


def test_config_cross_checks():
    with pytest.raises(ValueError, match="Invalid r_min=5: expected 1 <= r_min <= r=4"):
        config(r_min=5)
    with pytest.raises(ValueError, match="Invalid eval_rank=6"):
        config(eval_rank=6)


# --- tuner invariants ------------------------------------------------------------------------------------------------
def test_init_keeps_output_in_train_and_eval():
    base = mlp()
    model = get_peft_model(mlp(), config()).eval()
    torch.testing.assert_close(model(X), base(X), rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(model(X), base(X), rtol=0, atol=0)


@pytest.mark.parametrize("fixed", [False, True])
def test_forward_merge_at_each_rank(fixed):
    base = mlp()
    model = get_peft_model(mlp(), config(init_lora_weights=False, lora_alpha=6, fixed_scale=fixed)).eval()
    layer = model.base_model.model[0]
    A, B = layer.dylora_A["default"], layer.dylora_B["default"]
    for b in (1, 2, 4):
        model.base_model.set_rank(b)
        s = 6 / (4 if fixed else b)
        expected = base[0](X) + s * X @ (B[:, :b] @ A[:b]).T
        torch.testing.assert_close(layer(X), expected, rtol=1e-12, atol=1e-12)
        out = model(X)
        model.merge_adapter()
        torch.testing.assert_close(model(X), out, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="unmerge it first"):
            model.base_model.set_rank(1 if b != 1 else 2)
        model.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, base[0].weight, rtol=0, atol=1e-15)
    with model.disable_adapter():  # the base weights went through merge / unmerge: equal up to rounding
        torch.testing.assert_close(model(X), base(X), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="Invalid rank=5"):
        model.base_model.set_rank(5)


def test_train_mode_one_rank_per_peft_model_forward():
    model = get_peft_model(mlp(), config(init_lora_weights=False)).train()
    sampler = model.base_model.rank_sampler()
    drawn = set()
    for _ in range(30):
        model(X)
        b = sampler.current
        drawn.add(b)
        layer = model.base_model.model[0]  # called again (e.g. a checkpoint recompute): the same rank
        expected = layer.base_layer(X) + layer.scale("default", b) * X @ (
            layer.dylora_B["default"][:, :b] @ layer.dylora_A["default"][:b]).T
        torch.testing.assert_close(layer(X), expected, rtol=1e-12, atol=1e-12)
        assert sampler.current == b
    assert len(drawn) > 1 and drawn <= {1, 2, 3, 4}


def test_train_mode_without_peft_model_redraws_when_a_layer_repeats():
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(config(init_lora_weights=False, rank_seed=3), mlp()).train()
    sampler = model[0].dylora_sampler["default"]
    ranks = []
    for _ in range(30):
        model(X)
        ranks.append(sampler.current)
    assert len(set(ranks)) > 1  # each forward (layer 0 asking again) is a new step
    b = sampler.current
    model[2](torch.tanh(model[0].base_layer(X)))  # layer 2 asking again: a new step
    assert sampler._seen == {id(model[2])} and 1 <= b <= 4


def test_save_load_round_trip_keeps_eval_rank(tmp_path):
    model = get_peft_model(mlp(), config(init_lora_weights=False)).eval()
    model.base_model.set_rank(3)
    out = model(X)
    assert set(get_peft_model_state_dict(model)) == {f"base_model.model.{i}.dylora_{f}" for i in (0, 2) for f in "AB"}
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    assert loaded.peft_config["default"].eval_rank == 3
    torch.testing.assert_close(loaded(X), out, rtol=1e-13, atol=1e-13)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if "dylora_" in n)
    merged = copy.deepcopy(loaded).merge_and_unload()
    assert not any(isinstance(m, DyLoRALayer) for m in merged.modules())
    torch.testing.assert_close(merged(X), out, rtol=1e-12, atol=1e-12)
    loaded.base_model.set_rank(1)
    assert not torch.allclose(loaded(X), out)


def test_gpt2_conv1d_merge_matches_forward():
    from tests.helpers.tiny_models import tiny_gpt2

    model = get_peft_model(tiny_gpt2(torch.float64), DyLoRAConfig(target_modules=["c_attn"], r=4, eval_rank=2,
                                                                  init_lora_weights=False)).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-10, atol=1e-10)


def test_low_cpu_mem_usage_load_and_per_adapter_ranks(tmp_path):
    model = get_peft_model(mlp(), config(init_lora_weights=False, eval_rank=2)).eval()
    out = model(X)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(X), out, rtol=1e-13, atol=1e-13)
    loaded.load_adapter(tmp_path, "other", is_trainable=True)
    loaded.base_model.set_rank(4, adapter_name="other")
    layer = loaded.base_model.model[0]
    assert layer.dylora_eval_rank == {"default": 2, "other": 4}
    assert loaded.base_model.rank_sampler("other") is not loaded.base_model.rank_sampler("default")
    loaded.delete_adapter("other")
    assert list(loaded.peft_config) == ["default"] and "other" not in layer.dylora_sampler


def test_rescale_adapter_scale():
    from peft.helpers import rescale_adapter_scale

    model = get_peft_model(mlp(), config(init_lora_weights=False)).eval()
    layer = model.base_model.model[0]
    delta = layer(X) - layer.base_layer(X)
    with rescale_adapter_scale(model, 2.0):
        torch.testing.assert_close(layer(X) - layer.base_layer(X), 2 * delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(X) - layer.base_layer(X), delta, rtol=0, atol=0)


def test_gradient_checkpointing_recompute_uses_the_steps_rank():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(12, 6).double()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    torch.manual_seed(0)
    model = get_peft_model(Checkpointed(), config(target_modules=["inner"], init_lora_weights=False)).train()
    for _ in range(10):  # a different rank in the recompute would raise (saved tensors' shapes differ)
        model(X).pow(2).sum().backward()
    assert model.base_model.model.inner.dylora_A["default"].grad is not None
