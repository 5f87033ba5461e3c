"""What the LoRA-GA code holds, and for how long: gradients handed to `LoraGAContext` or `preprocess_loraga` live no
longer than the context / the model they belong to, are found by the model object itself (never by `id()`, which a
later object can reuse), and the A0/B0 record lives on the tuner, freed with it."""

from __future__ import annotations

import gc
import importlib
import pkgutil
import weakref

import pytest
import torch
from torch import nn

import peft.tuners.loraga as loraga_pkg
from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
from peft.tuners.loraga.context import active_gradients
from peft.tuners.loraga.model import init_record
from peft.utils.lora_ga_utils import LoraGAContext, estimate_gradient
from tests.tuners.loraga.helpers import llama, token_batches


class Tiny(nn.Module):
    """One Linear and no reference cycle: dropping the last reference frees it at once, so CPython's allocator
    usually hands its address to the next object of the same size (the case `id()`-keyed state gets wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


_UPSTREAM = dict(target_modules=["lin"], r=2, init_lora_weights="lora_ga")


def _preprocess(model: nn.Module, config=None) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    preprocess_loraga(model, config or LoraConfig(**_UPSTREAM), lambda: model(x).pow(2).sum().backward())


def _tensors_in(obj, seen=None) -> int:
    """How many tensors `obj` (a module global) reaches through dicts, lists, tuples, sets and weak dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary, dict)):
        return sum(_tensors_in(k, seen) + _tensors_in(v, seen) for k, v in list(obj.items()))
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_tensors_in(v, seen) for v in obj)
    if isinstance(obj, LoraGAContext):
        return sum(_tensors_in(v, seen) for v in vars(obj).values())
    return 0


def _loraga_modules():
    names = [f"{loraga_pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(loraga_pkg.__path__)]
    return [importlib.import_module(n) for n in names + ["peft.utils.lora_ga_utils"]]


def test_preprocess_gradients_die_with_their_model():
    model = Tiny()
    _preprocess(model)
    probe = weakref.ref(active_gradients(model)["lin"])
    del model
    gc.collect()
    assert probe() is None


def test_model_at_a_reused_address_sees_no_gradients():
    """Models whose preprocess_loraga gradients were never used are dropped; new models often get their addresses.
    None may pick up the old gradients: get_peft_model warns (nothing waits) and keeps the base as it is."""
    old = [Tiny() for _ in range(8)]
    for model in old:
        _preprocess(model)
    old_ids = {id(model) for model in old}
    del model
    old = None  # each freed at once (no cycle): their addresses are free for the next Tiny objects
    new = [Tiny() for _ in range(8)]
    reused = [model for model in new if id(model) in old_ids]
    if not reused:
        pytest.skip("the allocator reused no address here; nothing to check")
    assert all(active_gradients(model) is None for model in reused)
    before = reused[0].lin.weight.detach().clone()
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        peft_model = get_peft_model(reused[0], LoraConfig(**_UPSTREAM))
    assert torch.equal(peft_model.base_model.model.lin.base_layer.weight, before)


def test_lookup_is_by_model_not_by_address(monkeypatch):
    """The same, made deterministic: every object is given one address (as if each new model reused the last one's
    memory). The gradients of a dropped model, and of a live other model, stay invisible to a new one."""
    import peft.tuners.loraga.context as context_module

    monkeypatch.setattr(context_module, "id", lambda obj: 12345, raising=False)
    dropped, live = Tiny(), Tiny()
    _preprocess(dropped)
    del dropped
    gc.collect()
    _preprocess(live)
    new = Tiny()
    assert active_gradients(new) is None and active_gradients(live) is not None
    with LoraGAContext(model=live, named_grad={}):
        assert active_gradients(new) is None


def test_context_drops_its_gradients_on_exit():
    """The context is the only holder while it is open; after `with`, even a context object still referenced keeps
    neither the gradients nor the model, and it cannot be opened again."""
    model, batches = llama(), token_batches()
    grads = estimate_gradient(model, batches)
    probe = weakref.ref(grads["model.layers.0.self_attn.q_proj"])
    context = LoraGAContext(model=model, named_grad=grads)
    with context:
        assert active_gradients(model) is not None
        peft_model = get_peft_model(model, LoraGAConfig(target_modules=["q_proj"], r=2))
    assert active_gradients(model) is None
    del grads
    gc.collect()
    assert probe() is None
    model_probe = weakref.ref(model)
    del model, peft_model
    gc.collect()
    assert model_probe() is None
    with pytest.raises(RuntimeError, match="closed"):
        context.__enter__()


def test_context_drops_gradients_when_the_build_fails():
    model = llama()
    grads = estimate_gradient(model, token_batches(), peft_config=LoraGAConfig(target_modules=["q_proj"]))
    probe = weakref.ref(grads["model.layers.0.self_attn.q_proj"])
    context = LoraGAContext(model=model, named_grad=grads)
    with pytest.raises(ValueError, match="No estimated gradient"), context:
        get_peft_model(model, LoraGAConfig(target_modules=["q_proj", "v_proj"], r=2))
    del grads
    gc.collect()
    assert probe() is None and active_gradients(model) is None


def test_preprocess_gradients_are_dropped_after_the_build_that_used_them():
    """Gradients left over by a build that targeted fewer modules must not initialise a later adapter: they were
    estimated on the base before it was offset."""
    model = llama()
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, init_lora_weights="lora_ga")
    batches = token_batches()

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    probe = weakref.ref(active_gradients(model)["model.layers.0.self_attn.v_proj"])
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights="lora_ga"))
    assert active_gradients(model) is None
    gc.collect()
    assert probe() is None
    with pytest.warns(UserWarning, match="No LoraGAContext"):
        peft_model.add_adapter("later", LoraConfig(target_modules=["v_proj"], r=2, init_lora_weights="lora_ga"))


def test_init_record_is_instance_state_freed_with_the_model():
    batches = token_batches()
    models, probes = [], []
    for seed in (0, 1):
        model = llama(seed=seed)
        with LoraGAContext(model=model, named_grad=estimate_gradient(model, batches)):
            peft_model = get_peft_model(model, LoraGAConfig(target_modules=["q_proj"], r=2))
        models.append(peft_model)
    records = [init_record(m.base_model)["default"] for m in models]
    assert records[0] is not records[1]
    key = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(records[0][key][0], records[1][key][0])
    probes = [weakref.ref(t) for t in records[0][key]]
    del records, model, peft_model
    models.pop(0)
    gc.collect()
    assert all(p() is None for p in probes)
    assert init_record(models[0].base_model)["default"][key][0].abs().sum() > 0  # the other model keeps its own


def test_no_module_level_state_keeps_tensors():
    """After every LoRA-GA route (context, failed context, preprocess_loraga used and unused) and deleting the
    models, no module-level container in the LoRA-GA code reaches a tensor."""
    model, batches = llama(), token_batches()
    with LoraGAContext(model=model, named_grad=estimate_gradient(model, batches)):
        peft_model = get_peft_model(model, LoraGAConfig(target_modules=["q_proj"], r=2))
    failed = llama()
    with pytest.raises(ValueError), LoraGAContext(model=failed, named_grad={}):
        get_peft_model(failed, LoraGAConfig(target_modules=["q_proj"], r=2))
    unused, used = Tiny(), Tiny()
    _preprocess(unused)
    _preprocess(used)
    get_peft_model(used, LoraConfig(**_UPSTREAM))
    del model, peft_model, failed, unused, used
    gc.collect()
    held = {f"{mod.__name__}.{name}": n for mod in _loraga_modules() for name, value in vars(mod).items()
            if (n := _tensors_in(value))}
    assert held == {}
