"""`LoraConfig`: the fields of a LoRA adapter (upstream's names and JSON form) and what each accepts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, Optional, Union

from ...config import PeftConfig
from ...utils.config_validation import (
    Refused,
    Rule,
    boolean,
    either,
    integer,
    number,
    one_of,
    optional,
    pattern_dict,
    regex,
    sequence_of,
    text,
)
from ...utils.peft_types import PeftType
from .corda import CordaConfig
from .eva import EvaConfig
from .init_methods import LOFTQ_RULE, check_data_driven_options, init_weights_rule, sub_config_rule

_BIAS = ("none", "all", "lora_only")
from ..trainable_tokens.indices import _TOKEN_IDS, check_trainable_token_indices  # noqa: E402

_INITS = (True, False, "gaussian")
_LORA_GA_OPTIONS = ("direction", "scale", "stable_gamma", "dtype")


def normalized_token_indices(value):
    """The same indices as plain Python lists of ints (tuples and numpy ints become JSON-able)."""
    if isinstance(value, dict):
        return {name: [int(i) for i in ids] for name, ids in value.items()}
    return [int(i) for i in value]


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}: expected {expected}.")


def _lora_ga_options(value):
    """Upstream's `lora_ga_config` sub-config: a dict, or an object with LoRA-GA's option attributes; stored as
    `peft.tuners.lora.LoraGAConfig` (the sub-config class), as upstream does."""
    if not isinstance(value, dict) and not any(hasattr(value, k) for k in _LORA_GA_OPTIONS):
        raise Refused()
    from .hooks import lora_init_hook

    hook = lora_init_hook("lora_ga")  # registered by peft.tuners.loraga
    if hook is None or hook.sub_config is None:
        raise Refused("LoRA-GA is not available (peft.tuners.loraga was not imported)")
    try:
        return hook.sub_config.from_value(value)
    except ValueError as exc:
        raise Refused(str(exc).rstrip(".")) from None


def _token_indices(value):
    check_trainable_token_indices(value)
    return None if value is None else normalized_token_indices(value)


_MODULE_NAMES = either(regex(), sequence_of(text(), "module name strings", into=set))
_LORA_GA_SUB_CONFIG = Rule(f"a dict or object of LoRA-GA options {_LORA_GA_OPTIONS}", _lora_ga_options)
_TOKEN_INDICES = Rule(f"None, {_TOKEN_IDS}, or a dict from embedding module name to such a list", _token_indices)


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation `W' = W + s B A`, `s = lora_alpha / r` (rsLoRA: `lora_alpha / sqrt(r)`).

    Args:
        r: rank of the update. lora_alpha: numerator of the scale. lora_dropout: dropout on the LoRA input.
        target_modules: a list of module names (matched as a dotted suffix), a regex (full match), or
            "all-linear" (every linear layer but the output layer); None uses the architecture's default.
        exclude_modules: same forms as `target_modules`; matches are never adapted.
        layers_to_transform / layers_pattern: only adapt blocks with these indices (in `<pattern>.<index>.`).
        rank_pattern / alpha_pattern: per-module `r` / `lora_alpha`, keys are regexes on a dotted suffix.
        use_rslora: use `lora_alpha / sqrt(r)` (Kalajdzievski 2023). bias: "none", "all" or "lora_only".
        fan_in_fan_out: the base stores W as (in, out) (GPT-2's Conv1D). modules_to_save: modules trained whole.
        init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A normal, std 1/r), False (random B).
        target_parameters: parameters to adapt directly (a full name or a dotted suffix, e.g.
            "mlp.experts.gate_up_proj"): 2-D `(out, in)` or fused 3-D expert stacks, one update per expert; see
            `peft.tuners.lora.param_wrapper`. Needs lora_dropout=0 and fan_in_fan_out=False.
        use_dora: DoRA (Liu et al. 2024): `W' = m / ||W + s B A||_c * (W + s B A)`, `m` a trained magnitude per
            output channel (see `peft.tuners.lora.dora`). lora_bias: lora_B gets a bias (B: Linear / Conv layers).
        ensure_weight_tying: an adapted embedding and the layers tied to it (`tie_word_embeddings`) stay tied:
            `modules_to_save` copies share one weight, LoRA factors are shared (see
            `peft.tuners.lora.tying`); with `trainable_token_indices`, tied layers need the same ids.
        trainable_token_indices: train only these rows of an embedding beside the LoRA layers: a list of token ids
            (the input embedding), or a dict from embedding module name to token ids, e.g. `{"embed_tokens": [5]}`.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to adapt."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Never adapt these."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the LoRA branch input."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Base weight stored as (in, out)."})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases train."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by lora_alpha / sqrt(r)."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Modules trained and saved."})
    init_lora_weights: Union[bool, str] = field(default=True, metadata={"help": "True, False or 'gaussian'."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Block indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Block list name."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module rank (regex -> r)."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha (regex -> alpha)."})
    lora_ga_config: Optional[dict] = field(default=None, metadata={"help": "Upstream spelling of LoRA-GA."})
    loftq_config: dict = field(default_factory=dict, metadata={"help": "LoftQ: {'loftq_bits', 'loftq_iter'}."})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token ids whose embedding rows train: a list, or {module name: list}."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: train a per-output-channel magnitude too."})
    lora_bias: bool = field(default=False, metadata={"help": "Give lora_B a trainable bias (merged into the base's)."})
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Bare parameters to adapt (e.g. fused MoE experts 'mlp.experts.down_proj')."})
    ensure_weight_tying: bool = field(default=False, metadata={
        "help": "Keep tied layers tied (see `peft.tuners.lora.tying`)."})
    eva_config: Optional[EvaConfig] = field(default=None, metadata={"help": "EVA options (init_lora_weights='eva')."})
    corda_config: Optional[CordaConfig] = field(
        default=None, metadata={"help": "CorDA options (init_lora_weights='corda')."})

    peft_type_default: ClassVar[Optional[PeftType]] = PeftType.LORA
    unsupported_upstream_fields: ClassVar[tuple[str, ...]] = (
        "layer_replication", "megatron_config", "megatron_core",
        "use_qalora",
        "qalora_group_size", "alora_invocation_tokens", "arrow_config", "kasa_config",
        "monteclora_config", "use_bdlora", "velora_config", "runtime_config",
    )
    field_rules: ClassVar[dict[str, Rule]] = {
        "r": integer(1),
        "target_modules": optional(_MODULE_NAMES),
        "exclude_modules": optional(_MODULE_NAMES),
        "lora_alpha": number(0),
        "lora_dropout": number(0, 1, low_open=False),
        "fan_in_fan_out": boolean(),
        "bias": one_of(_BIAS),
        "use_rslora": boolean(),
        "modules_to_save": optional(sequence_of(text(), "module name strings")),
        "init_lora_weights": init_weights_rule(_INITS + ("lora_ga",)),
        "loftq_config": LOFTQ_RULE,
        "layers_to_transform": optional(either(integer(0), sequence_of(integer(0), "ints >= 0"))),
        "layers_pattern": optional(either(text(), sequence_of(text(), "strings"))),
        "rank_pattern": optional(pattern_dict(integer(1))),
        "alpha_pattern": optional(pattern_dict(number(0))),
        "lora_ga_config": optional(_LORA_GA_SUB_CONFIG),
        "trainable_token_indices": _TOKEN_INDICES,
        "use_dora": boolean(),
        "lora_bias": boolean(),
        "target_parameters": replace(optional(sequence_of(text(), "parameter name strings")),
                                     lead=lambda value: "`target_parameters` must be a list of strings or None."),
        "ensure_weight_tying": boolean(),
        "eva_config": sub_config_rule("eva_config", EvaConfig),
        "corda_config": sub_config_rule("corda_config", CordaConfig),
    }

    def _check_combinations(self) -> None:
        super()._check_combinations()
        self._check_dora_and_lora_bias()
        check_data_driven_options(self)
        _check(self.init_lora_weights != "loftq" or bool(self.loftq_config), "loftq_config", self.loftq_config,
               "a non-empty dict (e.g. {'loftq_bits': 4, 'loftq_iter': 1}) when init_lora_weights is 'loftq'")
        for name in ("layers_to_transform", "layers_pattern"):  # upstream's wording first, then ours
            if getattr(self, name) is not None and isinstance(self.target_modules, str):
                raise ValueError(f"`{name}` cannot be used when `target_modules` is a str: target_modules="
                                 f"{self.target_modules!r} is a regular expression on full module names, which "
                                 f"{name} would not restrict; expected target_modules as a list of module names.")
        if self.layers_pattern and self.layers_to_transform is None:  # [] / "" mean "any block list" (upstream)
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified "
                             f"(got layers_pattern={self.layers_pattern!r}, layers_to_transform=None).")

    def _register_custom_module(self, mapping: dict) -> None:
        """Experimental (upstream's API): adapt modules of the given types with the given LoRA layer classes,
        `{module_type: lora_layer_cls}`, tried before the built-in layers (see `peft.tuners.lora.dispatch`). Not
        saved with the config: register again after `LoraConfig.from_pretrained`."""
        for module_type, layer_cls in mapping.items():
            if not (isinstance(module_type, type) and isinstance(layer_cls, type)):
                raise ValueError(f"Invalid custom module mapping {module_type!r}: {layer_cls!r}; expected a module "
                                 "class mapped to a LoRA layer class.")
        custom = dict(getattr(self, "_custom_modules", None) or {})
        custom.update(mapping)
        object.__setattr__(self, "_custom_modules", custom)

    def _check_dora_and_lora_bias(self) -> None:
        """DoRA and `lora_bias` exclude each other and LoRA-GA (whose init and final save assume `W + s B A`);
        DoRA excludes LoRA-Pro (its adjusted gradients assume `W + s B A`; B's bias is an ordinary parameter there);
        `lora_bias` needs the plain init (upstream's rule)."""
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError("The argument lora_bias=True is only supported with init_lora_weights=True or False, "
                             f"got init_lora_weights={self.init_lora_weights!r} instead.")
        if self.lora_bias and self.use_dora:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False.")
        method = type(self).peft_type_default
        lora_ga = method == PeftType.LORAGA or self.init_lora_weights == "lora_ga" or self.lora_ga_config is not None
        for name in ("use_dora", "lora_bias"):
            if not getattr(self, name):
                continue
            if lora_ga:
                raise ValueError(f"Invalid {name}=True with LoRA-GA: its init and its final save (a plain LoRA equal "
                                 "to B A - B0 A0) assume W + s B A; expected False.")
            if method == PeftType.LORAPRO and name == "use_dora":  # a bias on B trains as an ordinary parameter
                raise ValueError(f"Invalid {name}=True with LoRA-Pro: its adjusted gradients pair A and B only and "
                                 "assume W + s B A; expected False.")
