"""SoRA's gate schedule: the proximal step (model method and `SoraGateProximal`, both modes), a small training run
where gates reach exactly zero while the loss falls, and compaction (outputs unchanged, save / load)."""

from __future__ import annotations

import re

import pytest
import torch

from peft import PeftModel, SoraConfig, SoraGateProximal, get_peft_model
from peft.tuners.sora import non_gate_parameters, proximal_gate_step, sora_gate_parameters
from tests.tuners.sora.test_model import F64, config, inputs, mlp, randomize, sora_layers


def _gates(model, adapter="default"):
    return {k: layer.sora_gate[adapter].detach().clone() for k, layer in sora_layers(model)}


def test_apply_gate_proximal_soft_thresholds_every_gate():
    model = get_peft_model(mlp(), config(sparsity_lambda=0.5))
    randomize(model, zero_some=False)
    before = _gates(model)
    zeros = model.base_model.apply_gate_proximal(lr=0.4)  # threshold 0.2 from the config's lambda
    after = _gates(model)
    for key, g in before.items():
        torch.testing.assert_close(after[key], torch.sign(g) * (g.abs() - 0.2).clamp(min=0), rtol=0, atol=1e-15)
    assert zeros == sum(int((g.abs() <= 0.2).sum()) for g in before.values()) > 0
    model.base_model.apply_gate_proximal(lr=1.0, sparsity_lambda=0.0)  # explicit lambda = 0: nothing moves
    assert all(torch.equal(_gates(model)[k], after[k]) for k in after)


def test_gate_proximal_after_main_optimizer_follows_its_lr():
    model = get_peft_model(mlp(), config(sparsity_lambda=2.0))
    randomize(model, zero_some=False)
    main = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    prox = SoraGateProximal(model, lr=main)
    model(inputs()).pow(2).mean().backward()
    smooth = {k: layer.sora_gate["default"].detach() - 0.05 * layer.sora_gate["default"].grad
              for k, layer in sora_layers(model)}
    main.step()
    prox.step()
    for key, g in _gates(model).items():  # T_{0.05 * 2}(g - 0.05 grad): the paper's eq. 6 through two optimizers
        torch.testing.assert_close(g, proximal_gate_step(smooth[key], 0.05, 2.0), rtol=0, atol=1e-15)


def test_gate_proximal_gradient_step_mode_and_schedule():
    model = get_peft_model(mlp(), config())
    randomize(model, zero_some=False)
    prox = SoraGateProximal(model, lr=0.1, sparsity_lambda=0.2, gradient_step=True, schedule="linear",
                            max_lambda=0.6, schedule_steps=2)
    assert {id(p) for p in non_gate_parameters(model)}.isdisjoint({id(g) for g in sora_gate_parameters(model)})
    for step, lam in enumerate((0.2, 0.4, 0.6)):
        prox.zero_grad()
        model(inputs()).pow(2).mean().backward()
        want = {k: proximal_gate_step(layer.sora_gate["default"].detach(), 0.1, lam, layer.sora_gate["default"].grad)
                for k, layer in sora_layers(model)}
        prox.step()
        for key, g in _gates(model).items():
            torch.testing.assert_close(g, want[key], rtol=0, atol=1e-15, msg=f"step {step}")
    state = prox.state_dict()
    fresh = SoraGateProximal(model, lr=0.1, sparsity_lambda=0.2, gradient_step=True, schedule="linear",
                             max_lambda=0.6, schedule_steps=2)
    fresh.load_state_dict(state)
    assert fresh.steps_done == 3


def test_gate_proximal_refuses_bad_arguments():
    model = get_peft_model(mlp(), config())
    with pytest.raises(ValueError, match=re.escape("Invalid lr=-1.0")):
        SoraGateProximal(model, lr=-1.0)
    with pytest.raises(ValueError, match=re.escape("Invalid schedule='cosine'")):
        SoraGateProximal(model, lr=0.1, schedule="cosine")
    with pytest.raises(ValueError, match="no SoRA layers"):
        SoraGateProximal(mlp(), lr=0.1)
    with pytest.raises(ValueError, match=re.escape("Invalid gradient_step=True")):
        SoraGateProximal(model, lr=torch.optim.SGD(model.parameters(), lr=0.1), gradient_step=True)


def _teacher_data(n: int = 64):
    """Targets from the base MLP with a rank-1 change of lin0: one live component is enough."""
    teacher = mlp()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        u, v = torch.randn(5, 1, generator=gen, dtype=F64), torch.randn(1, 6, generator=gen, dtype=F64)
        teacher.lin0.weight += 0.8 * u @ v
    x = torch.randn(n, 6, generator=gen, dtype=F64)
    return x, teacher(x).detach()


def _train(model, steps: int = 300, lr: float = 1e-2):
    x, y = _teacher_data()
    main = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    prox = SoraGateProximal(model, lr=main)
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        main.step()
        prox.step()
        main.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_makes_gates_sparse_while_loss_falls():
    torch.manual_seed(0)
    model = get_peft_model(mlp(), config(r=4, sparsity_lambda=0.5, init_sora_weights=True))
    losses = _train(model)
    ranks = model.base_model.gate_ranks()
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    assert sum(ranks.values()) < 8, ranks  # some gate entries are exactly zero
    assert min(ranks.values()) >= 0
    dense = get_peft_model(mlp(), config(r=4, sparsity_lambda=0.0))
    _train(dense)
    assert sum(dense.base_model.gate_ranks().values()) == 8  # lambda = 0: no entry is switched off


def test_compaction_keeps_outputs_and_survives_save_load(tmp_path):
    x = inputs()
    model = get_peft_model(mlp(), config(r=6))
    randomize(model)  # gate entries 0 and 3 exactly zero in every layer
    with torch.no_grad():
        model.base_model.model.lin1.sora_gate["default"].zero_()  # a layer with no live component
    before = model(x)
    n_before, _ = model.get_nb_trainable_parameters()
    ranks = model.base_model.compact()
    assert ranks == {"lin0": 4, "lin1": 1}
    after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-13)
    n_after, _ = model.get_nb_trainable_parameters()
    assert n_after == 4 * (6 + 5 + 1) + 1 * (5 + 4 + 1) < n_before
    assert model.peft_config["default"].rank_pattern == {"lin0": 4, "lin1": 1}
    layer = model.base_model.model.lin0
    assert layer.sora_A["default"].weight.shape == (4, 6) and layer.sora_B["default"].weight.shape == (5, 4)
    assert layer.scaling["default"] == 3.0 / 6  # the scale of r_max is kept
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(loaded(x), after, rtol=0, atol=0)
    assert loaded.base_model.model.lin0.r["default"] == 4
    torch.testing.assert_close(loaded.merge_and_unload()(x), before, rtol=0, atol=1e-12)


def test_compact_after_training_then_train_on(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(mlp(), config(r=4, sparsity_lambda=0.5))
    _train(model, steps=300)
    x = inputs()
    before = model(x)
    live = model.base_model.gate_ranks()
    assert sum(live.values()) < 8
    ranks = model.base_model.compact()
    assert ranks == {k: max(v, 1) for k, v in live.items()}
    assert model.base_model.gate_ranks() == live
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-13)
    _train(model, steps=5)  # a new optimizer over the compacted tensors trains on
    model.save_pretrained(tmp_path)
    cfg = SoraConfig.from_pretrained(tmp_path)
    assert cfg.rank_pattern == ranks


def test_compact_refuses_merged_adapter():
    model = get_peft_model(mlp(), config())
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge before compacting"):
        model.base_model.compact()
