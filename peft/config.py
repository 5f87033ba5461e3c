"""`PeftConfig`: the adapter configuration, its JSON file (`adapter_config.json`) and its registry lookup."""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from . import __version__
from .registry import PEFT_TYPE_TO_CONFIG_MAPPING
from .utils.config_validation import Refused, Rule, boolean, mapping, member_of, optional, text
from .utils.constants import CONFIG_NAME
from .utils.hub import hub_download_arguments, resolve_adapter_file
from .utils.io import atomic_write_text
from .utils.peft_types import PeftType, TaskType


class MissingConfigKeysError(TypeError, ValueError):
    """An adapter config without the keys every config needs (`peft_type`). A TypeError as upstream raises it,
    and a ValueError like every other bad config here."""


def _get_commit_hash(pkg_name: str) -> Optional[str]:
    """The VCS commit `pkg_name` was installed from (pip's `direct_url.json`, PEP 610), or None when unknown."""
    try:
        files = importlib.metadata.distribution(pkg_name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == "direct_url.json":
            vcs = json.loads(entry.locate().read_text()).get("vcs_info") or {}
            return vcs.get("commit_id")
    return None


def _writer_version() -> str:
    """The `peft_version` recorded in new configs: the package version; for a dev version (ambiguous on its own)
    with `@<commit>` appended, or `@UNKNOWN` when the commit cannot be found."""
    version = __version__
    try:
        from packaging.version import InvalidVersion, Version

        is_dev = Version(version).is_devrelease
    except (ImportError, InvalidVersion):
        is_dev = False
    if not is_dev:
        return version
    try:
        commit = _get_commit_hash("peft")
    except Exception as exc:  # noqa: BLE001 - recording a version must never break building a config
        warnings.warn(f"A dev version of PEFT is used but there was an error while trying to determine the commit hash "
                      f"({type(exc).__name__}: {exc}); peft_version is recorded as {version}@UNKNOWN.")
        commit = None
    return f"{version}@{commit or 'UNKNOWN'}"


def _inert(value: Any) -> bool:
    return value in (None, False, 0, "", "megatron.core", 16) or value == {} or value == []


@dataclass
class PeftConfig:
    """Fields shared by every adapter type; subclasses add the method's own fields.

    The JSON form is `dataclasses.asdict` with enums as their values, sets as sorted lists and sorted keys.

    Every field listed in a class's `field_rules` (merged over the class hierarchy; see
    `peft.utils.config_validation`) is checked whenever it is assigned: in the constructor, when loading
    `adapter_config.json`, and afterwards (`config.r = 8`), so a bad value fails where it is set, before any model
    is touched. Checks that relate several fields run at construction (`_check_combinations`) and in `validate()`.
    """

    peft_type: Optional[Union[str, PeftType]] = field(default=None, metadata={"help": "The adapter method."})
    task_type: Optional[Union[str, TaskType]] = field(default=None, metadata={"help": "The task of the model."})
    base_model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Name or path of the base."})
    revision: Optional[str] = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the adapter (no training)."})
    auto_mapping: Optional[dict] = field(default=None, metadata={"help": "Auto class used to load the base."})
    peft_version: Optional[str] = field(default=None, metadata={"help": "Package version that wrote the config."})

    # The PeftType a subclass stands for; None on the base class.
    peft_type_default: ClassVar[Optional[PeftType]] = None
    # Upstream fields this fork does not implement: accepted (and dropped) only at an inert value.
    unsupported_upstream_fields: ClassVar[tuple[str, ...]] = ()
    # What each field accepts (this class's own fields; subclasses list theirs). `peft_type` is added per class.
    field_rules: ClassVar[dict[str, Rule]] = {
        "task_type": dataclasses.replace(optional(member_of(TaskType)), lead=lambda value: (
            f"Invalid task type: {value!r}. Must be one of the following task types: {', '.join(_names(TaskType))}."
        )),
        "base_model_name_or_path": optional(text(paths=True)),
        "revision": optional(text()),
        "inference_mode": boolean(),
        "auto_mapping": optional(mapping()),
        "peft_version": optional(text()),
    }

    def __post_init__(self) -> None:
        if self.peft_version is None:
            self.peft_version = _writer_version()
        self._check_combinations()

    def __setattr__(self, name: str, value: Any) -> None:
        rule = _rules_of(type(self)).get(name)
        object.__setattr__(self, name, value if rule is None else rule.check(name, value))

    def validate(self) -> None:
        """Check every field again (values changed in place, e.g. `config.rank_pattern[k] = v`, included) and the
        checks across fields; raise ValueError naming the first bad one."""
        for name, rule in _rules_of(type(self)).items():
            if hasattr(self, name):
                object.__setattr__(self, name, rule.check(name, getattr(self, name)))
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Checks that relate several fields (subclasses add theirs)."""

    # Properties that transformers' Trainer and upstream user code read.
    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (enums as strings, sets as sorted lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write `adapter_config.json` into `save_directory` (temporary name, then rename)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; expected a folder.")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update({k: _jsonable(v) for k, v in kwargs.items()})
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
        **kwargs,
    ) -> "PeftConfig":
        """Load `adapter_config.json` from a local folder or a hub repository id (offline: from the cache).

        `kwargs` that name config fields override the file; those of `hf_hub_download` (`cache_dir`, `token`,
        `proxies`, ...) locate it; others (loader arguments callers forward wholesale, such as transformers'
        `trust_remote_code`) are ignored, as upstream does."""
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in hub_download_arguments()}
        path = resolve_adapter_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, revision, **hub_kwargs)
        data = cls.from_json_file(path)
        fields = {f.name for f in dataclasses.fields(PeftConfig)} | _all_config_fields()
        data.update({k: v for k, v in kwargs.items() if k in fields})
        return cls.from_peft_type(_source=path, **data)

    @classmethod
    def from_json_file(cls, path_json_file: str) -> dict[str, Any]:
        try:
            with open(path_json_file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Malformed adapter config {path_json_file!r}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"Adapter config {path_json_file!r} must hold a JSON object, got {type(data).__name__}.")
        if "runtime_config" in data:  # settings of one session (upstream's LoraRuntimeConfig), never part of a file
            warnings.warn(f"Ignoring the 'runtime_config' key in {path_json_file!r}: runtime settings are not stored "
                          "with an adapter.")
            del data["runtime_config"]
        return data

    @classmethod
    def from_peft_type(cls, _source: str = "<dict>", **kwargs) -> "PeftConfig":
        """Build the registered config class named by `kwargs['peft_type']` (must be `cls` or a subclass)."""
        if "peft_type" not in kwargs or kwargs["peft_type"] is None:
            raise MissingConfigKeysError(
                f"The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
                f"({_source!r} has no 'peft_type'; expected one of {_names(PeftType)}; is it a PEFT adapter config?)"
            )
        peft_type = _to_enum(PeftType, kwargs["peft_type"], "peft_type", source=_source)
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(f"peft_type {peft_type.value!r} in {_source!r} has no registered config class.")
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        if not issubclass(config_cls, cls):
            raise ValueError(
                f"{_source!r} holds a {peft_type.value} adapter ({config_cls.__name__}), not a {cls.__name__}."
            )
        return config_cls._from_known_kwargs(_source, kwargs)

    @classmethod
    def _from_known_kwargs(cls, source: str, kwargs: dict[str, Any]) -> "PeftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in kwargs.items() if k in names}
        extra = {k: v for k, v in kwargs.items() if k not in names}
        used = sorted(k for k in extra if k in cls.unsupported_upstream_fields and not _inert(extra[k]))
        if used:
            detail = ", ".join(f"{k}={extra[k]!r}" for k in used)
            raise ValueError(f"Adapter config {source!r} uses upstream features not supported here: {detail}.")
        dropped = sorted(k for k in extra if k not in cls.unsupported_upstream_fields)
        if dropped:
            warnings.warn(
                f"Unexpected keyword arguments {dropped} for class {cls.__name__}, these are ignored. They are not "
                f"fields of {cls.__name__} in this package (adapter config {source!r}); the file was probably written "
                "by a newer PEFT version, so check the adapter behaves as intended."
            )
        try:
            return cls(**known)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Adapter config {source!r}: {exc}") from None


_RULES: dict[type, dict[str, Rule]] = {}


def _rules_of(cls: type) -> dict[str, Rule]:
    """`field_rules` of `cls` and its bases (a subclass's entry wins), plus the rule for `peft_type`."""
    rules = _RULES.get(cls)
    if rules is None:
        rules = {}
        for klass in reversed(cls.__mro__):
            rules.update(vars(klass).get("field_rules", {}))
        rules["peft_type"] = _peft_type_rule(cls)
        _RULES[cls] = rules
    return rules


def _peft_type_rule(cls: type) -> Rule:
    """Any PeftType (or None) on the base class; on a method's class its own type, None meaning that type."""
    default = getattr(cls, "peft_type_default", None)
    any_type = member_of(PeftType)
    if default is None:
        return optional(any_type)

    def convert(value):
        if value is None:
            return default
        try:
            given = any_type.convert(value)
        except Refused:  # not a method name at all: the class decides, as upstream (which overwrites it)
            warnings.warn(f"Ignoring peft_type={value!r} for {cls.__name__}, which is a {default.value} config; "
                          f"peft_type is set to {default.value!r}.")
            return default
        if given is not default:  # another method: the caller meant a different config class
            raise Refused()
        return default

    return Rule(f"None or {default.value!r} (the peft_type of {cls.__name__})", convert)


def _all_config_fields() -> set[str]:
    return {f.name for config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.values() for f in dataclasses.fields(config_cls)}


def _names(enum_cls: type[enum.Enum]) -> list[str]:
    return [m.value for m in enum_cls]


def _to_enum(enum_cls, value, what: str, source: Optional[str] = None):
    try:
        return enum_cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        where = f" in {source!r}" if source else ""
        raise ValueError(f"Unknown {what} {value!r}{where}; expected one of {_names(enum_cls)}.") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
