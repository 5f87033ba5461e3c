"""Task-specific `PeftModel` classes (upstream's names). They differ only in which heads stay trainable."""

from __future__ import annotations

from torch import nn

from .config import PeftConfig
from .peft_model import PeftModel
from .utils.constants import TASK_TYPE_TO_HEAD_MODULES


class _HeadTrainingMixin:
    """Adds the task's head names (e.g. `classifier`, `score`) to `modules_to_save` so the head trains (all of them,
    as upstream, when `task_type` names the task: missing ones are then optional). Used directly with another
    `task_type`, only the heads the model has are added, so a model without a head is accepted (as upstream)."""

    task_key: str = ""

    def _prepare_config(self, peft_config: PeftConfig, model: nn.Module) -> None:
        heads = TASK_TYPE_TO_HEAD_MODULES.get(self.task_key, [])
        if not heads or not hasattr(peft_config, "modules_to_save"):
            return
        names = {key.rsplit(".", 1)[-1] for key, _ in model.named_modules() if key}
        current = list(peft_config.modules_to_save or [])
        if getattr(peft_config.task_type, "value", peft_config.task_type) != self.task_key:  # heads not optional
            heads = [h for h in heads if h in names]  # there, so add only those the model has
        added = [h for h in heads if h not in current]
        if added:
            peft_config.modules_to_save = current + added


class PeftModelForCausalLM(PeftModel):
    """Decoder-only language models (`AutoModelForCausalLM`)."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder language models (`AutoModelForSeq2SeqLM`)."""


class PeftModelForSequenceClassification(_HeadTrainingMixin, PeftModel):
    """Sequence classifiers; the classification head is trained and saved whole."""

    task_key = "SEQ_CLS"


class PeftModelForTokenClassification(_HeadTrainingMixin, PeftModel):
    """Token classifiers; the classification head is trained and saved whole."""

    task_key = "TOKEN_CLS"


class PeftModelForQuestionAnswering(_HeadTrainingMixin, PeftModel):
    """Extractive QA models; the `qa_outputs` head is trained and saved whole."""

    task_key = "QUESTION_ANS"


class PeftModelForFeatureExtraction(PeftModel):
    """Encoders used for embeddings (`AutoModel`)."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
