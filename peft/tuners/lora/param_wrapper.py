"""LoRA on a bare `nn.Parameter` (`LoraConfig(target_parameters=[...])`): `ParamWrapper` and its injection.

Modern MoE models (transformers 5: Qwen3-MoE, Mixtral, GPT-OSS, Llama4) keep their experts as fused 3-D parameters
`(num_experts, ., .)` that no `nn.Linear` owns. A `ParamWrapper` wraps the module holding such a parameter and, only
while that module runs, parametrizes the parameter so that the module's own forward sees `W + s B A` (one update per
expert for a 3-D stack). Accessing `module.<parameter>` outside the forward gives the plain base weight.

Layout (upstream PEFT's, so adapter files move both ways):

- 2-D parameter `(out, in)`: one expert; A is `(r, in)`, B is `(out, r)`, the update is `s B A`.
- 3-D parameter of E experts, stored `(E, out, in)` (transformers' default) or `(E, in, out)` when the module says
  `is_transposed = True`: `lora_A` holds `(E * r, in)` with expert e's A in rows `e*r:(e+1)*r`; `lora_B` holds
  `(out, r * E)` with expert e's B in columns `e, e + E, e + 2E, ...` (interleaved).
- Several parameters of one module: the wrappers nest, the first parameter (registration order) innermost, so its
  keys read `<module>.base_layer.lora_A.weight` and the next one's `<module>.lora_A.weight`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...utils.other import get_submodules
from ..tuner_layer import BaseTunerLayer
from .layer import LoraLayer


# --- pure math ------------------------------------------------------------------------------------------------------
def expert_factors(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert views of the stored factors: A `(E*r, in)` -> `(E, r, in)`, B `(out, r*E)` -> `(E, out, r)`."""
    A_e = A.reshape(num_experts, -1, A.shape[-1])  # (E, r, in)
    B_e = B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)  # (E, out, r)
    return A_e, B_e


def stack_factors(A_e: torch.Tensor, B_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `expert_factors`: `(E, r, in)`, `(E, out, r)` -> stored A `(E*r, in)`, B `(out, r*E)`."""
    num_experts, r, n = A_e.shape
    return A_e.reshape(num_experts * r, n), B_e.permute(1, 2, 0).reshape(B_e.shape[1], r * num_experts)


def stacked_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, param_shape: torch.Size,
                  transposed: bool) -> torch.Tensor:
    """`s B_e A_e` for every expert, shaped like the parameter (fp32 at least): `(out, in)` for a 2-D parameter,
    `(E, out, in)` for a 3-D one, `(E, in, out)` when `transposed`."""
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
    if len(param_shape) == 2:
        return (B.to(dtype) @ A.to(dtype)) * scaling
    A_e, B_e = expert_factors(A.to(dtype), B.to(dtype), param_shape[0])
    delta = torch.bmm(B_e, A_e) * scaling  # (E, out, in)
    return delta.transpose(1, 2) if transposed else delta


def parameter_features(shape: torch.Size, transposed: bool, name: str) -> tuple[int, int, int]:
    """(num_experts, in_features, out_features) of a targeted parameter of this shape."""
    if len(shape) == 2:
        return 1, shape[1], shape[0]
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2]) if transposed else (shape[0], shape[2], shape[1])
    raise ValueError(f"Invalid target parameter {name!r} of shape {tuple(shape)}: expected a 2-D (out, in) or a 3-D "
                     "(num_experts, out, in) parameter.")


# --- the parametrization --------------------------------------------------------------------------------------------
class _AddDelta(nn.Module):
    """Parametrization `W -> W + delta` (delta computed once per wrapper forward, cast to W's dtype)."""

    def __init__(self, delta: torch.Tensor) -> None:
        super().__init__()
        self.delta = delta  # a plain attribute: never saved, never a parameter

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W + self.delta.to(W.dtype)


# --- the layer --------------------------------------------------------------------------------------------------
class ParamWrapper(nn.Module, LoraLayer):
    """LoRA on the parameter `parameter_name` of `base_layer` (a module, or another `ParamWrapper` of the same
    module). The base module's forward runs with the parameter replaced by `W + sum_a s_a B_a A_a`."""

    def emptied_replacement(self):
        """Nested wrappers (one per parameter) drop the ones left with no adapter, keeping the others in order."""
        rebuilt = rebuild_chain(self)
        return rebuilt if rebuilt is not self else None

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, parameter_name: str, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, init_lora_weights: Union[bool, str] = True, use_rslora: bool = False,
        use_dora: bool = False, lora_bias: bool = False, **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        self.parameter_name = parameter_name
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora,
                          lora_bias)

    # --- the targeted parameter ---------------------------------------------------------------------------------
    def _is_transposed(self) -> bool:
        return bool(getattr(self.get_base_layer(), "is_transposed", False))

    def get_param(self) -> torch.Tensor:
        """The stored base tensor (under any parametrization the user added: its original)."""
        base = self.get_base_layer()
        if parametrize.is_parametrized(base, self.parameter_name):
            return base.parametrizations[self.parameter_name].original
        return getattr(base, self.parameter_name)

    def _read_features(self) -> tuple[int, int]:
        param = self.get_param()
        shape = getattr(param, "ds_shape", param.shape)
        self.num_experts, n, m = parameter_features(shape, self._is_transposed(), self.parameter_name)
        return n, m

    # --- creation -----------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     init_lora_weights: Union[bool, str] = True, use_rslora: bool = False, use_dora: bool = False,
                     lora_bias: bool = False) -> None:
        for field, value in (("use_dora", use_dora), ("lora_bias", lora_bias)):
            if value:
                raise ValueError(f"Invalid {field}={value} for target parameter {self.parameter_name!r}: LoRA on a "
                                 f"bare parameter supports plain LoRA only; expected {field}=False.")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"Invalid init_lora_weights={init_lora_weights!r} for target parameter "
                             f"{self.parameter_name!r}: expected True, False, 'gaussian' or 'lora_ga'.")
        if lora_dropout:
            raise ValueError(f"Invalid lora_dropout={lora_dropout} for target parameter {self.parameter_name!r}: "
                             "LoRA on a parameter adds to the weight, so it cannot drop its input; expected 0.")
        super().update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, use_rslora)

    def _make_factors(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def _check_factor_size(self, adapter_name: str, r: int) -> None:
        super()._check_factor_size(adapter_name, r * self.num_experts)

    def _move_adapter_to_base(self, adapter_name: str) -> None:
        param = self.get_param()
        device = None if param.device.type == "meta" else param.device
        dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
        for container in (self.lora_A, self.lora_B):
            if adapter_name in container:
                container[adapter_name].to(device=device, dtype=dtype)

    # --- merge --------------------------------------------------------------------------------------------------
    def _delta_fp32(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return stacked_delta(A, B, self.scaling[adapter_name], self.get_param().shape, self._is_transposed())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`s B A` per expert, shaped like the parameter, in its dtype."""
        return self._delta_fp32(adapter_name).to(self.get_param().dtype)

    def _writable_param(self) -> torch.Tensor:
        base = self.get_base_layer()
        if parametrize.is_parametrized(base, self.parameter_name):
            raise ValueError(f"Cannot merge into parameter {self.parameter_name!r} of {type(base).__name__}: it is "
                             "parametrized (torch.nn.utils.parametrize), so W + s B A has no stored tensor to go to.")
        return getattr(base, self.parameter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = [n for n in self._adapters_to_merge(adapter_names) if n in self.lora_A]
        if not names:
            return
        param = self._writable_param()
        for name in names:
            new = (param.data.to(torch.promote_types(param.dtype, torch.float32)) + self._delta_fp32(name))
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"Merging adapter {name!r} would put NaN/Inf into {self.parameter_name!r}; "
                                 "nothing merged.")
            param.data = new.to(param.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            import warnings

            warnings.warn("Already unmerged. Nothing to do.")
            return
        param = self._writable_param()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            old = param.data.to(torch.promote_types(param.dtype, torch.float32)) - self._delta_fp32(name)
            param.data = old.to(param.dtype)

    # --- forward ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _parametrized(self, names: list[str]):
        """While inside, the base module's `parameter_name` reads `W + sum s B A` (cached for the forward)."""
        base, pname = self.get_base_layer(), self.parameter_name
        delta = self._delta_fp32(names[0])
        for name in names[1:]:
            delta = delta + self._delta_fp32(name)
        proxy = _AddDelta(delta)
        original = self.get_param()
        requires_grad = original.requires_grad
        parametrize.register_parametrization(base, pname, proxy)
        original.requires_grad_(requires_grad)
        try:
            with parametrize.cached():
                yield
        finally:
            chain = base.parametrizations[pname]
            if len(chain) == 1:
                parametrize.remove_parametrizations(base, pname, leave_parametrized=False)
            else:  # a parametrization of the user's stays
                index = next(i for i, p in enumerate(chain) if p is proxy)
                del chain[index]

    def forward(self, x, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"Target parameter {self.parameter_name!r}: mixed adapter batches (adapter_names) are "
                             "not supported by LoRA on parameters.")
        kwargs.pop("adapter_names", None)
        names = [] if self.merged else self._lora_active()
        if self.disable_adapters and self.merged:
            self.unmerge()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        with self._parametrized(names):
            return self.base_layer(x, *args, **kwargs)

    def __repr__(self) -> str:
        text = super().__repr__()
        cut = text.find("(") + 1
        return f"lora.{text[:cut]}\n  parameter_name='{self.parameter_name}',{text[cut:]}"


# --- injection --------------------------------------------------------------------------------------------------
_MACHINERY = ("original_module", "modules_to_save", "token_adapter")


def _chain(module: nn.Module) -> list[ParamWrapper]:
    """The nested `ParamWrapper`s at one module path, outermost first."""
    found = []
    while isinstance(module, ParamWrapper):
        found.append(module)
        module = module.base_layer
    return found


def _own_tensor_names(module: nn.Module) -> list[str]:
    names = [n for n, p in module._parameters.items() if p is not None]
    if parametrize.is_parametrized(module):
        names += [n for n in module.parametrizations.keys() if n not in names]
    return names


def _matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def find_target_parameters(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter named by `targets` (a full key or a dotted suffix of it),
    in module order and, within a module, in registration order. Paths skip the `base_layer` of wrappers."""
    found = []
    for key, module in model.named_modules():
        parts = key.split(".") if key else []
        if isinstance(module, BaseTunerLayer) or any(p in _MACHINERY or p.startswith("lora_") for p in parts):
            continue
        path = ".".join(p for p in parts if p != "base_layer")
        for pname in _own_tensor_names(module):
            if _matches(f"{path}.{pname}" if path else pname, targets):
                found.append((path, pname))
    return found


def check_target_parameters(model: nn.Module, targets: list[str], no_modules: bool = False) -> list[tuple[str, str]]:
    """`find_target_parameters`, refusing (ValueError naming the entry) a target that matches no parameter and a
    parameter of the top-level module (its wrapper would have to contain itself). With target_modules given
    (`no_modules=False`) and no entry matching at all, nothing is returned: the tuner then warns (as upstream)."""
    found = find_target_parameters(model, targets)
    if not found and not no_modules:
        return []
    keys = [f"{path}.{pname}" if path else pname for path, pname in found]
    missing = [t for t in targets if not _matches_any(t, keys)]
    if missing:
        sample = [n for n, p in model.named_parameters() if p.ndim >= 2 and "lora_" not in n][:8]
        lead = ("No `target_modules` passed but also no `target_parameters` found. Please check the values for these "
                "arguments. " if no_modules else "")
        raise ValueError(f"{lead}target_parameters entries {missing} match no parameter of {type(model).__name__}; "
                         f"expected a parameter name or a dotted suffix of one, e.g. {sample}.")
    top = [pname for path, pname in found if not path]
    if top:
        raise ValueError(f"Targeting an nn.Parameter on the top-level module is not supported (parameter "
                         f"'{top[0]}'): its wrapper would have to contain the module itself. Target a parameter of a "
                         "submodule (invalid target_parameters entry).")
    return found


def _matches_any(target: str, keys: list[str]) -> bool:
    return any(k == target or k.endswith("." + target) for k in keys)


def inject_target_parameters(tuner, model: nn.Module, config, adapter_name: str) -> list[str]:
    """Wrap every parameter `config.target_parameters` names (or add `adapter_name` to its existing wrapper).
    Returns the targeted keys. `tuner` is the `LoraModel` (its per-key kwargs and init hook are used)."""
    targets = list(config.target_parameters or [])
    if not targets:
        return []
    if config.fan_in_fan_out:
        raise ValueError("Invalid fan_in_fan_out=True with target_parameters: a targeted parameter is read as "
                         "(out, in) or (num_experts, out, in); expected fan_in_fan_out=False.")
    keys = []
    for path, pname in check_target_parameters(model, targets, no_modules=not config.target_modules):
        key = f"{path}.{pname}"
        top = model.get_submodule(path)
        if isinstance(top, BaseTunerLayer) and not isinstance(top, ParamWrapper):
            raise ValueError(f"Trying to wrap an `nn.Parameter` of layer {path!r} of type {type(top).__name__}, which "
                             f"is not a valid target. Cannot target parameter {key!r}: module {path!r} is already a "
                             "LoRA layer "
                             "(also matched by target_modules); remove it from target_modules (or set "
                             "target_modules=[]).")
        kwargs = tuner._layer_kwargs(config, key)
        kwargs.pop("fan_in_fan_out", None)
        existing = next((w for w in _chain(top) if w.parameter_name == pname), None)
        if existing is not None:
            existing.update_layer(adapter_name, **kwargs)
            layer = existing
        else:
            layer = ParamWrapper(top, adapter_name, pname, **kwargs)
            parent, _, child = get_submodules(model, path)
            setattr(parent, child, layer)
        tuner._init_adapter_weights(layer, config, adapter_name, key)
        keys.append(key)
    return keys


def rebuild_chain(layer: nn.Module) -> nn.Module:
    """After adapters were deleted: the chain at one path without the wrappers left with no adapter."""
    wrappers = _chain(layer)
    if not wrappers:
        return layer
    current = wrappers[-1].base_layer
    for wrapper in reversed(wrappers):
        if wrapper._all_available_adapter_names():
            wrapper.base_layer = current
            current = wrapper
    return current


# --- LoRA-GA helpers (the init itself: peft.tuners.loraga.layout) ----------------------------------------------
def module_path(model: nn.Module, layer: nn.Module) -> Optional[str]:
    """Where `layer` sits in `model` (a nested wrapper's path ends in `.base_layer`)."""
    return next((name for name, module in model.named_modules() if module is layer), None)


class ParameterStandIn:
    """What the LoRA-GA gradient estimation needs of a target: `.weight`, here the targeted parameter."""

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight


def target_parameter_stand_ins(model: nn.Module, config) -> dict[str, ParameterStandIn]:
    """Parameter key -> stand-in for every parameter `config.target_parameters` names (LoRA-GA's estimation keys
    its gradients by these keys, which the injection looks them up by)."""
    targets = list(getattr(config, "target_parameters", None) or [])
    if not targets:
        return {}
    found = {}
    for path, pname in check_target_parameters(model, targets):
        module = model.get_submodule(path)
        param = module.parametrizations[pname].original if parametrize.is_parametrized(module, pname) \
            else getattr(module, pname)
        found[f"{path}.{pname}"] = ParameterStandIn(param)
    return found
