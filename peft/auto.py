"""`AutoPeftModel*`: load the base model named in an adapter's config, then the adapter, in one call.

    model = AutoPeftModelForCausalLM.from_pretrained("my-adapter")   # base from adapter_config.json

Each class pairs a transformers `AutoModelFor*` class (how the base is built) with a `PeftModelFor*` class (how
the adapter is wrapped). `AutoPeftModel` picks them from the config: `auto_mapping` when the adapter was saved
from a custom class, else `task_type`.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

from .config import PeftConfig
from .peft_model import PeftModel
from .peft_model_tasks import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

_TASK_TO_AUTO_CLASS = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_BASE_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "trust_remote_code")


class AutoPeftModel:
    """Base class; use `from_pretrained`. Subclasses fix the transformers auto class and the PeftModel class."""

    _target_class: Optional[str] = None  # name of a transformers auto class; None: from the config
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args, **kwargs):
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_path).")

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, adapter_name: str = "default", is_trainable: bool = False,
        config: Optional[PeftConfig] = None, revision: Optional[str] = None, **kwargs,
    ) -> PeftModel:
        """Build the base named by the adapter's `base_model_name_or_path` (with `kwargs` such as `torch_dtype`
        or `device_map`), then load the adapter onto it. A tokenizer saved beside the adapter that is longer than
        the base's vocabulary resizes the embeddings first (added tokens)."""
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision,
                                                 **{k: kwargs[k] for k in _BASE_KWARGS if k in kwargs})
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"The adapter config in {pretrained_model_name_or_path!r} names no base model "
                             "(base_model_name_or_path is empty); load the base yourself and use "
                             "PeftModel.from_pretrained(base, path).")
        auto_cls, peft_cls = cls._classes(peft_config, pretrained_model_name_or_path)
        base_revision = peft_config.revision if peft_config.revision not in (None, "main") else None
        base = auto_cls.from_pretrained(base_path, revision=base_revision, **kwargs)
        _resize_for_saved_tokenizer(base, pretrained_model_name_or_path)
        return peft_cls.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                        is_trainable=is_trainable, config=config, revision=revision)

    @classmethod
    def _classes(cls, peft_config: PeftConfig, where: str):
        import transformers

        task = getattr(peft_config.task_type, "value", peft_config.task_type)
        if cls._target_class is not None:
            expected = [t for t, name in _TASK_TO_AUTO_CLASS.items() if name == cls._target_class]
            if task is not None and task not in expected:
                raise ValueError(f"The adapter in {where!r} has task_type={task!r}, but {cls.__name__} loads "
                                 f"{cls._target_class} models (task_type {expected[0]!r}); use the matching "
                                 "AutoPeftModelFor* class or AutoPeftModel.")
            return getattr(transformers, cls._target_class), cls._target_peft_class
        mapping = peft_config.auto_mapping or {}
        if mapping.get("base_model_class"):
            library = importlib.import_module(mapping.get("parent_library") or "transformers")
            return getattr(library, mapping["base_model_class"]), PeftModel
        if task not in _TASK_TO_AUTO_CLASS:
            raise ValueError(f"The adapter in {where!r} has task_type={task!r} and no auto_mapping, so the base "
                             f"class is unknown; expected one of {sorted(_TASK_TO_AUTO_CLASS)}.")
        return getattr(transformers, _TASK_TO_AUTO_CLASS[task]), MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]


def _resize_for_saved_tokenizer(base, adapter_path: str) -> None:
    if not os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_path)
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is not None and len(tokenizer) > embeddings.weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModelForCausalLM(AutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
