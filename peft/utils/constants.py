"""File names and per-architecture defaults."""

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"

# `target_modules` value meaning every linear layer but the output layer (upstream's public name for it).
INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
# What `BaseTuner.get_model_config` returns for a model without a transformers config.
DUMMY_MODEL_CONFIG = {"model_type": "custom"}
# A list-valued `target_modules` at least this long is replaced, at injection, by the shortest name suffixes that
# select the same modules (`peft.tuners.target_matching.minimal_target_suffixes`); shorter lists are kept as given.
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20

# Default LoRA targets when `target_modules` is None, keyed by `model.config.model_type`.
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "vit": ["query", "value"],
    "swin": ["query", "value"],
}

# Heads that stay trainable (via modules_to_save) for each task type.
TASK_TYPE_TO_HEAD_MODULES: dict[str, list[str]] = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}
