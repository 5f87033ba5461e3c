"""Merging adapters into the base weights and taking the tuner layers out again: `BaseTuner`'s merge / unload
methods (a mixin, so that tuners_utils.py holds injection and adapter management)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..utils.other import ModulesToSaveWrapper, get_submodules
from .target_matching import _inside_adapter_machinery
from .tuner_layer import BaseTunerLayer


class MergeUnloadMixin:
    """Needs `self.model`, `self.peft_config` and `self.tuner_layers()` (BaseTuner's)."""

    def _check_known(self, adapter_names) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names or []):
            if name not in self.peft_config:
                raise ValueError(f"Unknown adapter {name!r}; available adapters: {sorted(self.peft_config)}.")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_known(adapter_names)
        for _, layer in self.tuner_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in self.tuner_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Merge the active (or named) adapters into the base weights and return the plain model."""
        return self._unload(merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every tuner layer without merging and return the model; a `modules_to_save` module becomes the
        active adapter's trained copy, as in `merge_and_unload` (upstream's behaviour)."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
        from tqdm.auto import tqdm

        self._check_known(adapter_names)
        keys = [n for n, _ in self.tuner_layers() if not _inside_adapter_machinery(n)] + [
            n for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)
        ]
        for key in tqdm(keys, disable=not progressbar, desc="Unloading " + ("and merging " if merge else "")):
            parent, target, target_name = get_submodules(self.model, key)
            if isinstance(target, ModulesToSaveWrapper):
                replacement = target.unwrapped()  # the active adapter's trained copy, merged or not (as upstream)
            else:
                layer = target  # LoRA ParamWrappers nest (one per parameter of a module): merge each
                while isinstance(layer, BaseTunerLayer):
                    if merge:
                        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    layer = layer.base_layer
                replacement = target.get_base_layer()
            setattr(parent, target_name, replacement)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model
