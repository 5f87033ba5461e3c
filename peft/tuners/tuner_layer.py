"""`BaseTunerLayer`: the mixin every tuner layer (LoRA's, trainable tokens', ...) builds on: it wraps `base_layer`
and keeps per-adapter weights in `ModuleDict`s. Imported by transformers as `peft.tuners.tuners_utils.BaseTunerLayer`
(re-exported there)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Optional, Union

from torch import nn


class BaseTunerLayer:
    """Mixin for a layer that wraps `base_layer` and holds per-adapter weights in `ModuleDict`s.

    Subclasses list the names of their per-adapter containers in `adapter_layer_names` (trainable) and
    `other_param_names` (plain per-adapter dicts such as `r` and `scaling`).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    _disable_adapters: bool = False
    _active_adapter: Union[str, list[str]] = "default"
    merged_adapters: list[str]

    def get_base_layer(self) -> nn.Module:
        base = self
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self):
        return self.get_base_layer().weight

    @property
    def bias(self):
        return self.get_base_layer().bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapters(self) -> list[str]:
        active = self._active_adapter
        return [active] if isinstance(active, str) else list(active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapter

    def _all_available_adapter_names(self) -> list[str]:
        names = []
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if hasattr(container, "keys"):
                names.extend(k for k in container.keys() if k not in names)
        return names

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the adapters on or off; off means the layer computes its base layer's output."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for attr in self.adapter_layer_names:
                getattr(self, attr).requires_grad_(False)
            self._disable_adapters = True

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Make `adapter_names` active and trainable; other adapters of this layer are frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, sub in container.items():
                flag = key in names
                if isinstance(sub, nn.Parameter):
                    sub.requires_grad_(flag)
                else:
                    sub.requires_grad_(flag)
        self._active_adapter = names[0] if len(names) == 1 else names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove `adapter_name`; if it was active, the other active adapters stay active (else the first left)."""
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        for value in list(vars(self).values()):  # per-adapter plain dicts a subclass did not list (e.g. use_rslora)
            if type(value) is dict and adapter_name in value:
                del value[adapter_name]
        if adapter_name in self.active_adapters:
            still_active = [n for n in self.active_adapters if n != adapter_name]
            remaining = still_active or self._all_available_adapter_names()[:1]
            if remaining:
                self.set_adapter(remaining)
            else:
                self._active_adapter = []

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """On-disk key -> in-memory key (both relative to this layer) of what adapter `adapter_name` saves here: every
        tensor of its entry in each `adapter_layer_names` container, with the adapter name dropped on disk
        (`<container>.<name>.weight` -> `<container>.weight`, a `ParameterDict` entry `<container>.<name>` ->
        `<container>`). A layer whose file format differs overrides this."""
        out = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if container is None or adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Module):
                for key in entry.state_dict().keys():
                    out[f"{attr}.{key}"] = f"{attr}.{adapter_name}.{key}"
            else:  # a tensor in a ParameterDict / BufferDict
                out[attr] = f"{attr}.{adapter_name}"
        return out

    def emptied_replacement(self) -> Optional[nn.Module]:
        """After `delete_adapter`: the module that takes this layer's place in the model, or None to keep it. A layer
        left with no adapter gives back its base layer; layers that nest (LoRA's ParamWrapper) override this."""
        return None if self._all_available_adapter_names() else self.base_layer

    @abstractmethod
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None: ...

    @abstractmethod
    def unmerge(self) -> None: ...
