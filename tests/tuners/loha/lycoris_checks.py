"""Invariant checks shared by the LoHa and LoKr model tests (each takes the config class and config kwargs).

Every check can fail: outputs are compared against the base model or against each other in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from peft import PeftModel, get_peft_model
from tests.tuners.loha.lycoris_interop import MODELS, perturb

TOL = 1e-10  # float64 throughout


def base_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[kind][0]().double().eval()


def inputs(kind: str) -> torch.Tensor:
    return torch.randn(*MODELS[kind][1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < tol


def adapted(kind: str, config_cls, seed: int = 3, **kwargs):
    model = get_peft_model(base_model(kind), config_cls(**kwargs))
    perturb(model, seed)
    return model.eval()


def check_init_preserves_output(kind, config_cls, **kwargs):
    x = inputs(kind)
    expected = base_model(kind)(x)
    model = get_peft_model(base_model(kind), config_cls(**kwargs)).eval()
    with torch.no_grad():
        assert close(model(x), expected)
    random_init = get_peft_model(base_model(kind), config_cls(**dict(kwargs, init_weights=False))).eval()
    with torch.no_grad():
        assert not close(random_init(x), expected, 1e-6)


def check_adapter_merged_reloaded(kind, config_cls, tmp_path, **kwargs):
    x = inputs(kind)
    base_out = base_model(kind)(x)
    model = adapted(kind, config_cls, **kwargs)
    with torch.no_grad():
        out = model(x)
        assert not close(out, base_out, 1e-6)
        with model.disable_adapter():
            assert close(model(x), base_out)
        model.save_pretrained(tmp_path / "a")
        model.merge_adapter()
        assert close(model(x), out)
        model.unmerge_adapter()
        assert close(model(x), out)
        model.disable_adapter_layers()
        assert close(model(x), base_out)  # unmerge restored the base weights exactly (float64)
        model.enable_adapter_layers()
        for low_cpu in (False, True):
            reloaded = PeftModel.from_pretrained(base_model(kind), tmp_path / "a", low_cpu_mem_usage=low_cpu).eval()
            assert close(reloaded(x), out)
        merged = copy.deepcopy(model).merge_and_unload()
        assert not any("hada_" in n or "lokr_" in n for n, _ in merged.named_parameters())
        assert close(merged(x), out)
        assert close(model.unload()(x), base_out)


def check_safe_merge_refuses_nan(kind, config_cls, **kwargs):
    model = adapted(kind, config_cls, **kwargs)
    layer = next(m for m in model.modules() if hasattr(m, "get_delta_weight"))
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        for p in (p for n, p in layer.named_parameters() if n.split(".")[0] in layer.adapter_layer_names):
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged


def check_multiple_adapters(kind, config_cls, tmp_path, **kwargs):
    x = inputs(kind)
    model = adapted(kind, config_cls, **kwargs)
    with torch.no_grad():
        first = model(x)
    model.add_adapter("other", config_cls(**kwargs))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():  # "other" is not active, so frozen: perturb its tensors by name
            if ".other" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        assert close(model(x), first)  # the active adapter is still "default"
        model.set_adapter("other")
        second = model(x)
        assert not close(second, first, 1e-6)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".other" in n for n in trainable)
        model.base_model.set_adapter(["default", "other"])
        layer = next(m for m in model.modules() if hasattr(m, "get_delta_weight"))
        delta = layer.get_delta_weight("default") + layer.get_delta_weight("other")
        h = torch.randn(2, *MODELS[kind][1][1:], dtype=torch.float64) if kind == "mlp" else x
        base = layer.get_base_layer()
        expected = base(h) + (torch.nn.functional.linear(h, delta) if isinstance(base, torch.nn.Linear)
                              else base._conv_forward(h, delta, None))
        assert close(layer(h), expected)  # both active: the deltas add up
        model.set_adapter("other")
        model.save_pretrained(tmp_path / "multi")
        model.delete_adapter("default")
        assert not any(".default" in n for n, _ in model.named_parameters())
        assert close(model(x), second)
        assert sorted(model.peft_config) == ["other"]
    reloaded = PeftModel.from_pretrained(base_model(kind), tmp_path / "multi" / "other").eval()
    with torch.no_grad():
        assert close(reloaded(x), second)


def check_training_reduces_loss(kind, config_cls, **kwargs):
    """Fit the output of the same base with a random adapter of the same config (a reachable target)."""
    x = torch.randn(*MODELS[kind][1], generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    teacher = get_peft_model(MODELS[kind][0](), config_cls(**dict(kwargs, init_weights=False)))
    with torch.no_grad():
        target = teacher(x)
    torch.manual_seed(0)
    model = get_peft_model(MODELS[kind][0](), config_cls(**kwargs))
    params = [p for p in model.parameters() if p.requires_grad]
    prefixes = ("hada_", "lokr_")
    assert all(any(part.startswith(prefixes) for part in n.split(".")) or "modules_to_save" in n
               for n, p in model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    model.train()
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def check_dropouts(kind, config_cls, **kwargs):
    x = inputs(kind)
    base_out = base_model(kind)(x)
    model = adapted(kind, config_cls, **dict(kwargs, module_dropout=1.0))
    with torch.no_grad():
        out_eval = model(x)
        model.train()
        assert close(model(x), base_out)  # every module skipped while training
    model = adapted(kind, config_cls, **dict(kwargs, rank_dropout=0.5))
    with torch.no_grad():
        assert close(model(x), out_eval)  # dropouts are off in eval mode (same seed, same adapter)
        model.train()
        torch.manual_seed(0)
        assert not close(model(x), out_eval, 1e-6)


def check_unsupported_target_leaves_model(config_cls):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="not supported"):
            get_peft_model(model, config_cls(target_modules=["0", "1"]))
    assert isinstance(model[0], torch.nn.Embedding) and isinstance(model[1], torch.nn.Linear)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
