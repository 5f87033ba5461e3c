"""Module plumbing: find submodules, keep trainable copies of whole modules, prepare k-bit models."""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import nn


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, attribute name) for the dotted module path `key`."""
    parent_key, _, target_name = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    return parent, model.get_submodule(key), target_name


_get_submodules = get_submodules  # upstream spelling


def infer_device() -> str:
    """The accelerator torch sees first ("cuda", "mps", "xpu"), else "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


class AuxiliaryTrainingWrapper(nn.Module):
    """Base of wrappers that train something beside the adapter layers (here: whole-module copies)."""

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        return {}


class ModulesToSaveWrapper(AuxiliaryTrainingWrapper):
    """Keeps `original_module` frozen and trains one deep copy of it per adapter (`modules_to_save[name]`).

    Saved keys drop the wrapper: `<path>.modules_to_save.<adapter>.<param>` is stored as `<path>.<param>`.
    `active_adapters` lists only adapters that have a copy here (empty: the original module is used).
    """

    adapter_layer_names: tuple[str, ...] = ("modules_to_save",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, module_to_save: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = nn.ModuleDict({})
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self.update(adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            active = self.active_adapters
            if self._disable_adapters or not active:
                return getattr(self.original_module, name)
            if active[0] in self.modules_to_save:
                return getattr(self.modules_to_save[active[0]], name)
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}': its active adapter "
                                 f"{active[0]!r} has no copy of this module") from None

    @property
    def active_adapter(self) -> Optional[str]:
        active = self.active_adapters
        return active[0] if active else None

    @property
    def active_adapters(self) -> list[str]:
        active = self._active_adapter
        return [active] if isinstance(active, str) else list(active)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def _current(self) -> nn.Module:
        if self._disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def update(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        self.original_module.requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled
        if self.active_adapter in self.modules_to_save:
            self.modules_to_save[self.active_adapter].requires_grad_(enabled)

    def check_set_adapter(self, adapter_names: Union[str, list[str]]) -> list[str]:
        """The names among `adapter_names` that have a copy here; more than one cannot be active at once."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = [n for n in names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"Only one adapter can be set at a time for ModulesToSaveWrapper: adapters {held} each "
                             "have their own copy of this modules_to_save module; only one of them can be active.")
        return held

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Use (and train) the copy of the one named adapter that has one; none: the original module."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = self.check_set_adapter(names)
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key in held)
        self._active_adapter = held

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self.active_adapters:
            self.set_adapter(list(self.modules_to_save.keys())[:1])

    def unwrapped(self) -> nn.Module:
        """The module to put back when the wrapper is removed: the active adapter's copy, else the original."""
        if self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        if adapter_name not in self.modules_to_save:
            return {}
        keys = self.modules_to_save[adapter_name].state_dict().keys()
        return {k: f"modules_to_save.{adapter_name}.{k}" for k in keys}


def __getattr__(name: str) -> Any:
    """`TrainableTokensWrapper` is importable from here as in upstream (loaded lazily: it builds on the tuners)."""
    if name == "TrainableTokensWrapper":
        from ..tuners.trainable_tokens.wrapper import TrainableTokensWrapper

        return TrainableTokensWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Get a (quantized) model ready for adapter training, in place (upstream's name and arguments).

    1. Freezes every parameter (the adapters added afterwards are the only trainable ones).
    2. Casts every plain fp16/bf16 parameter (norms, embeddings, head) to fp32 for stable training; quantized
       bitsandbytes weights (`Params4bit`, whose storage may be bf16, and `Int8Params`) are left as they are.
    3. With `use_gradient_checkpointing`: makes the input embeddings' output require grad (so a checkpointed
       block with reentrant checkpointing still backpropagates into its adapters) and turns on gradient
       checkpointing with `gradient_checkpointing_kwargs` (passed to `torch.utils.checkpoint`; `use_reentrant`
       defaults to False).
    4. With `auto_clear_cache`: empties the CUDA allocator cache after the casts (when CUDA is available).
    """
    checkpointing = ("activation_checkpointing_enable", "gradient_checkpointing_enable")  # transformers 5 / 4
    enable = next((getattr(model, n) for n in checkpointing if hasattr(model, n)), None)
    if use_gradient_checkpointing and enable is None:
        raise ValueError(
            f"use_gradient_checkpointing=True but {type(model).__name__} has no gradient_checkpointing_enable(); "
            "expected a transformers PreTrainedModel, or pass use_gradient_checkpointing=False."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param) is nn.Parameter:
            param.data = param.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs) if gradient_checkpointing_kwargs is not None else {}
        kwargs.setdefault("use_reentrant", False)
        _enable_input_grads(model)
        enable(kwargs)  # first positional argument: the checkpoint kwargs, under either name
    return model


def _enable_input_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    if hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


def fsdp_auto_wrap_policy(model: nn.Module):
    """An FSDP (v1) auto-wrap policy for a model with adapters, as transformers' Trainer and accelerate ask for it.

    Two kinds of units: each transformer block (the classes named by `FSDP_TRANSFORMER_CLS_TO_WRAP`, comma-separated,
    else the model's `_no_split_modules`), and each leaf module whose parameters all train (an adapter's `lora_A` /
    `lora_B`), so that FSDP never flattens frozen and trainable tensors into one flat parameter.
    """
    import functools
    import os

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    names = [n.strip() for n in names.split(",") if n.strip()] or list(getattr(model, "_no_split_modules", None) or [])
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"FSDP transformer layer classes {missing} are not in {type(model).__name__}; "
                         f"expected names of its block classes (e.g. {sorted(by_name)[:8]}).")

    def trains_alone(module: nn.Module) -> bool:
        params = list(module.parameters(recurse=False))
        return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)

    lambda_policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=trains_alone)
    blocks = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={by_name[n] for n in names})
    return functools.partial(_or_policy, policies=[lambda_policy, blocks])


def update_model_card(peft_model: nn.Module, output_dir: str) -> None:
    """Create or update `output_dir/README.md` for a saved adapter (what the Hub reads): metadata `library_name:
    peft`, `tags` (the method, e.g. `lora`; `transformers`; `base_model:adapter:<id>`), `base_model` when the model
    has a transformers config; a "Framework versions" line with the PEFT version. A new card is huggingface_hub's
    template; an existing card's text and metadata stay: tags are merged, other keys are only added."""
    import os

    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    path = os.path.join(output_dir, "README.md")
    # a new card starts from huggingface_hub's own model-card template (sections for the user to fill in)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    if card.data is None:
        card.data = ModelCardData()
    base = peft_model.get_base_model()
    config = peft_model.active_peft_config
    base_id = None
    if hasattr(base, "config") and hasattr(base.config, "to_dict"):
        base_id = base.config.to_dict().get("_name_or_path") or None
    tags = set(card.data.tags or []) | set(getattr(base, "model_tags", None) or [])
    if type(base).__module__.startswith("transformers."):
        tags.add("transformers")
    tags.add(str(getattr(config.peft_type, "value", config.peft_type)).lower())  # the method: lora, loraga, lorapro
    if base_id:
        tags.add(f"base_model:adapter:{base_id}")
        card.data.base_model = card.data.base_model or base_id
    card.data.library_name = "peft"
    if tags:
        card.data.tags = sorted(tags)
    if not card.data.pipeline_tag and type(peft_model).__name__ == "PeftModelForCausalLM":
        card.data.pipeline_tag = "text-generation"
    version_line = f"- PEFT {__version__}"
    lines = card.text.splitlines()
    if version_line not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 1, version_line)
        else:
            lines += ["", heading, "", version_line]
    card.text = "\n".join(lines).strip("\n") + "\n"
    from .io import atomic_write_text, folder_lock, remove_stale_temporaries

    with folder_lock(output_dir):  # a killed earlier save may have left its README temporary: clear it first
        remove_stale_temporaries(output_dir, ["README.md"])
        atomic_write_text(path, str(card))  # a temporary name renamed over README.md: a failed save keeps the old card
