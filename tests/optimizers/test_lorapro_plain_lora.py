"""LoRA-Pro on a plain `LoraConfig` model (issue 12, item 10): the community port's README (laihongphuc/lora_pro,
"seed 000") runs with only its import line changed, and `LoraProAdamW` / `register_lorapro_adjustment` /
`AdamWLoRAPro` train any LoRA model, pairing A with B through the LoRA layers, with `LoraProConfig`'s defaults."""

from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch
from torch import nn

from peft import LoraConfig, LoraProConfig, get_peft_model
from peft.optimizers import AdamWLoRAPro, AdamWLoraPro, LoraProAdamW, register_lorapro_adjustment
from peft.tuners.lorapro import LoraProOptions
from tests.optimizers.test_lorapro import Net, _backward

F64 = torch.float64


class YourModel(nn.Module):
    """A tiny stand-in for the README's ViT: attention projections "query" / "value" and a "classifier" head."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(16, 16)
        self.value = nn.Linear(16, 16)
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(torch.tanh(self.value(torch.tanh(self.query(x)))))


def test_seed_readme_runs_with_only_its_import_line_changed():
    """The README's "Basic Usage", statement for statement; only `from lora_pro import AdamWLoRAPro` became
    `from peft.optimizers import AdamWLoRAPro` (and `peft_model`, which the README uses undefined, is the model)."""
    from peft.optimizers import AdamWLoRAPro  # the README's `from lora_pro import AdamWLoRAPro`

    torch.manual_seed(0)
    model = YourModel()
    lora_config = LoraConfig(
        r=8,  # rank
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(model, lora_config)
    peft_model = model
    classifier_params = list(peft_model.classifier.parameters())
    other_params = [p for n, p in peft_model.named_parameters() if "classifier" not in n]
    optimizer_cls = torch.optim.AdamW(classifier_params, lr=1e-3, weight_decay=1e-2)
    with pytest.warns(UserWarning, match="lora_dropout > 0"):  # item 13: the README trains with dropout 0.1
        optimizer_lora = AdamWLoRAPro(
            other_params,
            lr=1e-3,
            weight_decay=0.01,
            T_max=1000,  # warmup steps
            scaling_factor=2.0,
        )
    optimizer = [optimizer_lora, optimizer_cls]
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    dataloader = [(torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(3)]
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    num_epochs = 2
    for epoch in range(num_epochs):  # noqa: B007 (the README's loop)
        for batch, targets in dataloader:
            outputs = model(batch)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer[0].step()
            optimizer[1].step()
            optimizer[0].zero_grad()
            optimizer[1].zero_grad()
    assert len(optimizer_lora.pairs) == 2 and all(torch.isfinite(p).all() for p in model.parameters())
    moved = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, lora[n])]
    assert sorted(moved) == sorted(lora)  # A and B of both layers trained (B left zero at the first step)


def _twins(mode=None, **config):
    """The same base and LoRA initialisation as a plain LoRA model and as a LoRA-Pro model."""
    kwargs = dict(r=2, lora_alpha=3, target_modules=["fc1", "fc2"], modules_to_save=["head"], init_lora_weights=False)
    kwargs.update(config)
    out = []
    for config_cls, extra in ((LoraConfig, {}), (LoraProConfig, {} if mode is None else {"mode": mode})):
        torch.manual_seed(0)
        out.append(get_peft_model(Net().to(F64), config_cls(**kwargs, **extra)))
    return out


def _train(model, optimizer, steps=3):
    for seed in range(1, steps + 1):
        _backward(model, seed)
        optimizer.step()


def _assert_same(model, twin):
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_lorapro_adamw_on_a_plain_lora_model_equals_the_lorapro_model(mode):
    """The LoRA-Pro options come from the optimizer on a plain LoRA model (the LoRA-Pro model reads them from its
    config): same steps; by model, by param groups (the Trainer's way) and through the seed API."""
    plain, pro = _twins(mode=mode)
    assert not any(type(m).__name__.startswith("LoraPro") for m in plain.modules())
    _train(plain, LoraProAdamW(plain, lr=1e-2, weight_decay=0.1, mode=mode))
    _train(pro, LoraProAdamW(pro, lr=1e-2, weight_decay=0.1))
    _assert_same(plain, pro)
    plain, pro = _twins(mode=mode, modules_to_save=None)
    groups = [{"params": [p for p in plain.parameters() if p.requires_grad][::-1]}]
    _train(plain, LoraProAdamW(groups, lr=1e-2, mode=mode))
    _train(pro, AdamWLoRAPro([p for p in pro.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0))
    _assert_same(plain, pro)


def test_adamw_lorapro_pairs_by_layer_not_by_position():
    """Shuffled parameters (the seed paired zip(params[::2], params[1::2])): the same steps as in module order."""
    runs = []
    for shuffle in (False, True):
        plain, _ = _twins(modules_to_save=None)
        params = [p for p in plain.parameters() if p.requires_grad]
        if shuffle:
            random.Random(3).shuffle(params)
            assert [id(p) for p in params] != [id(p) for p in plain.parameters() if p.requires_grad]
        _train(plain, AdamWLoRAPro(params, lr=1e-2, weight_decay=0.01, T_max=2, scaling_factor=1.5))
        runs.append(plain)
    _assert_same(*runs)


def test_registered_adjustment_on_a_plain_lora_model_equals_the_lorapro_model():
    models = _twins()
    for model in models:
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        register_lorapro_adjustment(sgd, model)
        _train(model, sgd)
    _assert_same(*models)


def test_defaults_are_lorapro_configs():
    config, options = LoraProConfig(), LoraProOptions()
    assert {f.name: getattr(options, f.name) for f in dataclasses.fields(options)} == {
        "mode": config.mode, "x_mode": config.x_mode, "damping": config.damping}
    plain, _ = _twins()
    opt = LoraProAdamW(plain)
    assert all(pair.options == options for pair in opt.pairs)


def test_plain_lora_errors():
    plain, _ = _twins(modules_to_save=None)
    lora = [p for p in plain.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"scaling_factor=2\.0 disagrees with the scale s=1\.5"):
        AdamWLoRAPro(lora, scaling_factor=2.0)  # the seed's default, but these layers have s = 3 / 2
    with pytest.raises(ValueError, match="partner"):
        AdamWLoRAPro(lora[:1])
    torch.manual_seed(0)
    too_wide = get_peft_model(Net(), LoraConfig(r=5, target_modules=["fc2"]))  # fc2 is 4 x 5
    with pytest.raises(ValueError, match="r <= min"):
        LoraProAdamW(too_wide)
    with pytest.raises(ValueError, match="r <= min"):
        AdamWLoRAPro([p for p in too_wide.parameters() if p.requires_grad])
    assert AdamWLoraPro is AdamWLoRAPro  # the name the seed package exports


def test_no_warning_without_dropout():
    plain, _ = _twins()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraProAdamW(plain)
        AdamWLoRAPro([p for n, p in plain.named_parameters() if "lora_" in n])
