"""Enumerations of tuner types and task types (upstream's names and values)."""

import enum


class PeftType(str, enum.Enum):
    """The adapter methods this package knows. Values are what `adapter_config.json` stores."""

    LORA = "LORA"
    LORAGA = "LORAGA"
    LORAPRO = "LORAPRO"
    # LoRA variants (docs/variants.md): the first four in upstream's format, the others in this package's own.
    LOHA = "LOHA"
    LOKR = "LOKR"
    VERA = "VERA"
    ADALORA = "ADALORA"
    KRONA = "KRONA"
    TIEDLORA = "TIEDLORA"
    DYLORA = "DYLORA"
    SORA = "SORA"
    # Prompt-learning methods: their configs load and save, but no tuner implements them here.
    PREFIX_TUNING = "PREFIX_TUNING"
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"


class TaskType(str, enum.Enum):
    """The task a `PeftModel` wraps; picks the `PeftModelFor*` class."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
