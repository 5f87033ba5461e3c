"""Config behaviour adopted from upstream PEFT 0.21.2 (its tests/test_config.py matches on these words and types),
with this package's extra detail kept after upstream's sentence."""

import json
import warnings

import pytest
import torch

import peft
from peft import LoraConfig, PeftConfig, PromptEncoderConfig, TaskType
from peft import config as config_module
from peft.config import MissingConfigKeysError
from peft.tuners.prompt_learning import PromptEncoder
from tests.upstream_harness import run_upstream


def _save_with(tmp_path, config, **extra):
    config.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = {**json.loads(path.read_text()), **extra}
    path.write_text(json.dumps(data))
    return data


def test_invalid_task_type_names_the_value_and_every_task_type():
    with pytest.raises(ValueError) as info:
        LoraConfig(task_type="invalid-task-type")
    message = str(info.value)
    assert message.startswith("Invalid task type: 'invalid-task-type'. Must be one of the following task types: ")
    assert all(t.value in message for t in TaskType) and "None" in message
    config = LoraConfig()
    with pytest.raises(ValueError, match="Invalid task type: 'CLS'"):
        config.task_type = "CLS"  # assignment is checked too, and the config is unchanged
    assert config.task_type is None


@pytest.mark.parametrize("version", ["0.10", "1", "0.22.0+gapro"])
def test_peft_version_is_written_and_read_back(monkeypatch, tmp_path, version):
    monkeypatch.setattr(config_module, "__version__", version)
    config = LoraConfig()
    assert config.peft_version == version
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_version"] == version
    monkeypatch.setattr(config_module, "__version__", "9.9")
    assert PeftConfig.from_pretrained(tmp_path).peft_version == version, "the file's version, not the running one"


def test_dev_version_records_the_commit_or_unknown(monkeypatch):
    monkeypatch.setattr(config_module, "__version__", "0.15.0.dev7")
    monkeypatch.setattr(config_module, "_get_commit_hash", lambda name: "abc123")
    assert LoraConfig().peft_version == "0.15.0.dev7@abc123"
    monkeypatch.setattr(config_module, "_get_commit_hash", lambda name: None)
    assert LoraConfig().peft_version == "0.15.0.dev7@UNKNOWN"

    def broken(name):
        raise OSError("unreadable metadata")

    monkeypatch.setattr(config_module, "_get_commit_hash", broken)
    with pytest.warns(UserWarning, match="error while trying to determine the commit hash.*OSError"):
        assert LoraConfig().peft_version == "0.15.0.dev7@UNKNOWN"
    assert peft.config.__version__ == "0.15.0.dev7"


@pytest.mark.parametrize("loader", [LoraConfig, PeftConfig])
def test_unknown_keys_from_a_newer_version_warn_once_and_are_dropped(tmp_path, loader):
    config = LoraConfig(r=4, target_modules=["q"])
    _save_with(tmp_path, config, foobar="baz", spam=123)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = loader.from_pretrained(tmp_path)
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        "Unexpected keyword arguments ['foobar', 'spam'] for class LoraConfig, these are ignored.")
    assert type(loaded) is LoraConfig and loaded.to_dict() == config.to_dict()


def test_upstream_only_fields_in_use_are_still_refused(tmp_path):
    """Kept stricter than upstream: a feature this package lacks, set to a non-default value, must not load as a
    plain LoRA that silently behaves differently."""
    _save_with(tmp_path, LoraConfig(), use_qalora=True)
    with pytest.raises(ValueError, match="use_qalora=True"):
        LoraConfig.from_pretrained(tmp_path)


def test_a_json_without_peft_type_is_a_type_error_and_a_value_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar"}))
    for exc_type in (TypeError, ValueError):
        with pytest.raises(exc_type, match=r"The LoraConfig config .* missing required keys: \{'peft_type'\}"):
            LoraConfig.from_pretrained(tmp_path)
    assert issubclass(MissingConfigKeysError, TypeError) and issubclass(MissingConfigKeysError, ValueError)


def test_runtime_config_in_a_file_is_dropped_with_a_warning(tmp_path):
    config = LoraConfig()
    _save_with(tmp_path, config, runtime_config={"ephemeral_gpu_offload": True})
    with pytest.warns(UserWarning, match="runtime_config"):
        data = LoraConfig.from_json_file(str(tmp_path / "adapter_config.json"))
    assert data == config.to_dict()


def test_peft_type_that_is_no_method_is_overwritten_but_another_method_is_refused():
    with pytest.warns(UserWarning, match="Ignoring peft_type='test' for LoraConfig"):
        config = LoraConfig(peft_type="test")
    assert config.peft_type is peft.PeftType.LORA
    with pytest.raises(ValueError, match="LORAPRO"):
        LoraConfig(peft_type="LORAPRO")  # kept: the caller meant another config class


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": ".*foo", "layers_to_transform": [0]},
         "`layers_to_transform` cannot be used when `target_modules` is a str: target_modules='.*foo'"),
        ({"target_modules": ".*foo", "layers_pattern": ["bar"]},
         "`layers_pattern` cannot be used when `target_modules` is a str"),
        ({"target_modules": ["q"], "layers_pattern": "layers"},
         "When `layers_pattern` is specified, `layers_to_transform` must also be specified.*layers_pattern='layers'"),
    ],
)
def test_layer_selection_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)
    config = LoraConfig(target_modules=["q"], layers_to_transform=0, layers_pattern="layers")
    assert config.layers_to_transform == 0


_ENCODER = {"num_virtual_tokens": 3, "num_transformer_submodules": 2, "token_dim": 8, "encoder_hidden_size": 6}


def test_prompt_encoder_warns_only_when_the_mlp_ignores_encoder_num_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptEncoder(PromptEncoderConfig(**_ENCODER))
        PromptEncoder(PromptEncoderConfig(encoder_reparameterization_type="LSTM", encoder_num_layers=3, **_ENCODER))
    with pytest.warns(UserWarning) as record:
        PromptEncoder(PromptEncoderConfig(encoder_num_layers=5, **_ENCODER))
    assert str(record.list[0].message) == (
        "for MLP, the argument `encoder_num_layers` is ignored. Exactly 2 MLP layers are used.")


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_prompt_encoder_shapes_and_inference_mode(kind):
    encoder = PromptEncoder(PromptEncoderConfig(encoder_reparameterization_type=kind, **_ENCODER))
    indices = torch.arange(6).repeat(2, 1)  # (batch=2, n = 3 tokens * 2 submodules)
    assert encoder(indices).shape == (2, 6, 8)
    frozen = PromptEncoder(PromptEncoderConfig(encoder_reparameterization_type=kind, inference_mode=True, **_ENCODER))
    assert list(frozen.state_dict()) == ["embedding.weight"]
    torch.testing.assert_close(frozen(indices), frozen.embedding.weight[indices])
    with pytest.raises(ValueError, match="token_dim=None"):
        PromptEncoder(PromptEncoderConfig(num_virtual_tokens=3, num_transformer_submodules=1))


_UPSTREAM_ENCODER = """
import sys
from peft import PromptEncoder, PromptEncoderConfig
out = {}
for kind in ("MLP", "LSTM"):
    cfg = PromptEncoderConfig(encoder_reparameterization_type=kind, num_virtual_tokens=3, num_transformer_submodules=2,
                              token_dim=8, encoder_hidden_size=6, encoder_num_layers=2)
    out[kind] = {k: list(v.shape) for k, v in PromptEncoder(cfg).state_dict().items()}
emit(out)
"""


def test_prompt_encoder_state_dict_layout_matches_upstream():
    theirs = run_upstream(_UPSTREAM_ENCODER, args=[]).data
    for kind in ("MLP", "LSTM"):
        config = PromptEncoderConfig(encoder_reparameterization_type=kind, encoder_num_layers=2, **_ENCODER)
        ours = {k: list(v.shape) for k, v in PromptEncoder(config).state_dict().items()}
        assert ours == theirs[kind]
