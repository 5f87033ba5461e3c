"""`make compat` logic without running upstream: the selection rule, reason grouping, the report, the shim."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compat.report import build, category, reason_of, summarize
from compat.select import KEPT, Selector, group_of

REPO = Path(__file__).resolve().parents[2]
CM = "tests/test_custom_models.py::TestPeftCustomModel"


@pytest.fixture(scope="module")
def selector():
    return Selector()


@pytest.mark.parametrize("test_id", [
    f"{CM}::test_merge_layers[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs6]",
    f"{CM}::test_forward_float16[Conv2d 1 LoRA with DoRA-Conv2d-LoraConfig-config_kwargs31]",
    f"{CM}::test_merge_layers[LoRA + trainable tokens Same-lora+trainable_tokens-LoraConfig-config_kwargs_12-c]",
    "tests/test_decoder_models.py::TestDecoderModels::test_generate[LoraConfig-config_kwargs16-tiny-random-OPT]",
    "tests/test_tuners_utils.py::TestPeftCustomKwargs::test_regex_matching_valid_17_foo_bar_1_baz",
    "tests/test_initialization.py::TestLoraInitialization::test_lora_corda_hook_unregister",
    "tests/test_initialization.py::TestCordaInitialization::test_x[CordaConfig-1]",
    "tests/test_helpers.py::TestCheckIsPeftModel::test_nonexisting_hub_model",
    "tests/test_lora_ga.py::TestLoraGAIntegration::test_lower_precision_dtype[dtype0]",
    f"{CM}::test_default_target_modules[PeftConfig]",
    "tests/test_config.py::TestPeftConfig::test_missing_keys_warning",  # `miss` only as part of a word
    "tests/test_config.py::TestPeftConfig::test_default_values",  # `deft` only inside `default`
    # the upstream tuner types this fork implements count like LoRA
    f"{CM}::test_merge_layers[Vanilla MLP 1 AdaLoRA-MLP-AdaLoraConfig-config_kwargs327]",
    "tests/test_config.py::TestPeftConfig::test_methods[LoKrConfig-mandatory_kwargs17]",
    f"{CM}::test_forward_output_finite[Conv2d 1 LOHA-Conv2d-LoHaConfig-config_kwargs2]",
    "tests/test_low_level_api.py::TestInjectAdapterFromStateDict::test_same_layers[LoKr-Llama]",
    "tests/test_initialization.py::TestAdaLoraInitialization::test_x",
    "tests/test_vera.py::TestVera::test_x",
    "tests/test_custom_models.py::TestPeftCustomModel::test_vera_x[VeraConfig]",
])
def test_lora_and_generic_ids_are_kept(selector, test_id):
    assert selector.classify(test_id) == KEPT


@pytest.mark.parametrize("test_id, verdict", [
    (f"{CM}::test_merge_layers[Vanilla MLP 1 BOFT-MLP-BOFTConfig-config_kwargs327]", "other-tuner:BOFTConfig"),
    ("tests/test_config.py::TestPeftConfig::test_methods[IA3Config-mandatory_kwargs17]", "other-tuner:IA3Config"),
    ("tests/test_config.py::TestPeftConfig::test_x[LoHaConfig-IA3Config]", "other-tuner:IA3Config"),
    (f"{CM}::test_ia3_grouped_conv_feedforward_merge[False-Conv3d]", "other-tuner:ia3"),
    ("tests/test_low_level_api.py::TestInjectAdapterFromStateDict::test_same_layers[OFT-Llama]", "other-tuner:oft"),
    ("tests/test_initialization.py::TestPVeRA::test_x[PVeRA]", "other-tuner:pvera"),
    ("tests/test_lora_conversion.py::TestMissLoraConversion::test_miss_save_as_lora", "other-tuner:miss"),
    ("tests/test_initialization.py::TestBOFT::test_x[BOFT]", "other-tuner:boft"),
    ("tests/test_pvera.py::TestPVera::test_x", "other-tuner-file:test_pvera.py"),
    ("tests/test_xlora.py::TestXlora::test_x[LoraConfig]", "other-tuner-file:test_xlora.py"),
    (f"{CM}::test_merge_layers[Vanilla MLP 1 LoRA with KaSA-MLP-LoraConfig-config_kwargs14]", "lora-variant:kasa"),
    (f"{CM}::test_merge_layers[BD-LoRA B only-MLP-LoraConfig-config_kwargs284]", "lora-variant:bd_lora"),
    ("tests/test_lora_variants.py::TestActivatedLora::test_alora_activation", "lora-variant:alora"),
    ("tests/test_lora_variants.py::TestLoraVariants::test_applied[kasa-KasaConfig-c2]", "lora-variant:KasaConfig"),
    ("tests/test_arrow.py::TestArrow::test_x", "lora-variant-file:test_arrow.py"),
    ("tests/test_common_gpu.py::TestGpu::test_x[LoraConfig]", "gpu"),
    ("tests/test_other.py::test_x_multi_gpu_tests", "gpu"),
])
def test_other_tuners_variants_and_gpu_are_deselected(selector, test_id, verdict):
    assert selector.classify(test_id) == verdict
    assert group_of(verdict) == verdict.split(":")[0]


def test_selector_reads_tuners_and_configs_from_upstream_source(tmp_path):
    tuners = tmp_path / "peft" / "tuners"
    for name, body in {"lora": "class LoraConfig:\n", "newtuner": "class NewTunerConfig(PeftConfig):\n"}.items():
        (tuners / name).mkdir(parents=True)
        (tuners / name / "config.py").write_text(body)
    selector = Selector.from_upstream(tmp_path)
    assert selector.classify("tests/test_x.py::test_y[NewTunerConfig-c0]") == "other-tuner:NewTunerConfig"
    assert selector.classify("tests/test_x.py::test_newtuner_merges") == "other-tuner:newtuner"
    # a model config the source does not define is not a tuner
    assert selector.classify("tests/test_x.py::test_y[LlamaConfig-LoraConfig]") == KEPT


@pytest.mark.parametrize("message, reason", [
    ("compat.shim.MissingInFork: peft.tuners.lora.layer.Conv3d is not in this package",
     "MissingInFork: peft.tuners.lora.layer.Conv3d is not in this package"),
    ("AssertionError: assert 3 == 4\n  where 3 = len(...)", "AssertionError: assert N == N"),
    ("ValueError: bad <object at 0x7f3a2b> in /tmp/abc/x.py, 1.5e-3 off",
     "ValueError: bad <object at <addr>> in <path>, N off"),
    ("ValueError: 3 unexpected keys ['base_model.model.lin0.base_layer.bias', 'base_model.model.lin1.base_layer.bias']",
     "ValueError: N unexpected keys […]"),
    ("", "<no message>"),
])
def test_reason_strips_numbers_addresses_paths_and_module(message, reason):
    assert reason_of(message) == reason


def test_network_and_gpu_leave_the_denominator():
    assert category({"outcome": "failed", "message": "OSError: We couldn't connect to 'https://huggingface.co'"}) \
        == "network"
    assert category({"outcome": "error", "message": "huggingface_hub.errors.OfflineModeIsEnabled: x"}) == "network"
    assert category({"outcome": "skipped", "message": "test requires a GPU"}) == "gpu"
    assert category({"outcome": "skipped", "message": "not on Windows"}) == "skipped"
    assert category({"outcome": "failed", "message": "AssertionError: x"}) == "failed"


def _results():
    return {
        "tests/test_a.py::t1": {"outcome": "passed"},
        "tests/test_a.py::t2": {"outcome": "failed", "message": "AssertionError: assert 1 == 2"},
        "tests/test_a.py::t3": {"outcome": "failed", "message": "AssertionError: assert 5 == 7"},
        "tests/test_b.py::t1": {"outcome": "error", "message": "KeyError: 'x'", "when": "setup"},
        "tests/test_b.py::t2": {"outcome": "failed", "message": "OfflineModeIsEnabled: no hub"},
        "tests/test_b.py::t3": {"outcome": "skipped", "message": "needs cuda"},
        "tests/test_vera.py": {"outcome": "error", "message": "ImportError: x", "when": "collect"},
    }


def test_summary_counts_groups_and_deselection():
    selection = [{"file": "tests/test_a.py", "verdict": "kept", "count": 3},
                 {"file": "tests/test_a.py", "verdict": "other-tuner:VeraConfig", "count": 4},
                 {"file": "tests/test_b.py", "verdict": "lora-variant:kasa", "count": 2}]
    summary = summarize(_results(), selection, {"tests/test_vera.py": "other-tuner-file:test_vera.py"})
    assert summary["total"]["passed"] == 1 and summary["total"]["failed"] == 2 and summary["total"]["error"] == 1
    assert summary["total"]["network"] == 1 and summary["total"]["gpu"] == 1
    assert summary["denominator"] == 4 and summary["pass_rate"] == 0.25
    top = summary["failure_groups"][0]
    assert (top["reason"], top["count"], top["example"]) == ("AssertionError: assert N == N", 2, "tests/test_a.py::t2")
    assert summary["deselected"]["other-tuner:VeraConfig"] == 4
    assert summary["deselected"]["other-tuner-file:test_vera.py (collection error)"] == 1
    assert summary["deselected_by_family"] == {"other-tuner": 4, "lora-variant": 2, "other-tuner-file": 1}
    assert summary["per_file"]["tests/test_b.py"]["error"] == 1


def test_build_writes_json_and_markdown(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    summary = build(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["total"] == summary["total"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| tests/test_a.py | 1 | 2 | 0 | 0 | 0 | 0 |" in markdown and "AssertionError: assert N == N" in markdown


def test_shim_gives_placeholders_only_for_missing_names():
    """In a subprocess: the shim hooks imports process-wide, which must not leak into this test session."""
    script = textwrap.dedent("""
        import compat.shim
        import peft
        from peft import LoraConfig, get_peft_model
        from peft import NoSuchTunerConfig, no_such_function, NO_SUCH_CONSTANT
        from peft.tuners.no_such_module import Thing
        from compat.shim import MissingInFork
        assert LoraConfig.__module__.startswith("peft.") and not hasattr(LoraConfig, "compat_missing")
        assert not hasattr(get_peft_model, "compat_missing")
        placeholder = NoSuchTunerConfig(r=4)  # builds, as upstream's module-level test tables need
        for use in (lambda: placeholder.r, lambda: no_such_function(), lambda: Thing.from_pretrained("x")):
            try:
                use()
            except MissingInFork:
                pass
            else:
                raise SystemExit("no MissingInFork")
        assert isinstance(NO_SUCH_CONSTANT, str)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@dataclasses.dataclass
class _FakeLoraConfig:  # stands in for a config object given as a parameter; defaults are "off"
    r: int = 8
    megatron_core: str = "megatron.core"
    alora_invocation_tokens: list | None = None


class KasaConfig:  # same class name as upstream's variant config (or the shim's placeholder for it)
    pass


DM = "tests/test_decoder_models.py::TestDecoderModels::test_mixed_adapter_batches"


@pytest.mark.parametrize("params, verdict", [
    ({"config_kwargs": {"target_modules": None, "alora_invocation_tokens": [1]}}, "lora-variant:alora (param)"),
    ({"config_kwargs": {"r": 4, "use_qalora": True}}, "lora-variant:qalora (param)"),
    ({"config_kwargs": {"target_modules": ["lin0"], "kasa_config": KasaConfig(), "r": 4}}, "lora-variant:kasa (param)"),
    ({"config_kwargs": {"init_lora_weights": "mica"}}, "lora-variant:mica (param)"),
    ({"config": _FakeLoraConfig(alora_invocation_tokens=[5])}, "lora-variant:alora (param)"),
    ({"configs": [{"r": 2}, {"r": 2, "use_bdlora": True}]}, "lora-variant:bd_lora (param)"),
    ({"config_cls": KasaConfig}, "lora-variant:KasaConfig (param)"),
])
def test_variants_named_only_in_parametrized_values_are_deselected(selector, params, verdict):
    test_id = f"{DM}[LoraConfig-config_kwargs17-peft-internal-testing/tiny-random-OPTForCausalLM]"
    assert selector.classify(test_id) == KEPT  # the id alone does not name the variant
    assert selector.classify_item(test_id, params) == verdict
    assert group_of(verdict) == "lora-variant"


@pytest.mark.parametrize("params", [
    {"config_kwargs": {"target_modules": None, "alora_invocation_tokens": None, "use_qalora": False}},  # off
    {"config": _FakeLoraConfig()},  # megatron_core is set, but to its default: not a variant
    {"config_kwargs": {"init_lora_weights": "gaussian", "lora_alpha": 8, "fan_in_fan_out": True}},
    {"config_kwargs": {"target_modules": ["arrow_proj"]}},  # a word inside a value that is not that word alone
    {"config_kwargs": {"target_modules": ["lin0"], "use_dora": True}, "model_id": "narrow-mica-model"},
    {"config_kwargs": {"ia3_thing": 1, "vera_config": True}},  # other tuners are never found by value
    {"tensor_like": object(), "n": 0},
])
def test_parametrized_values_keep_lora_and_generic_tests(selector, params):
    assert selector.classify_item(f"{DM}[LoraConfig-config_kwargs3-m]", params) == KEPT


def test_parametrized_values_do_not_override_an_id_verdict(selector):
    test_id = f"{CM}::test_merge_layers[Vanilla MLP 1 BOFT-MLP-BOFTConfig-config_kwargs327]"
    assert selector.classify_item(test_id, {"config_kwargs": {"alora_invocation_tokens": [1]}}) \
        == "other-tuner:BOFTConfig"


def test_plugin_deselects_by_parametrized_values(tmp_path):
    """The plugin reads `item.callspec.params`: a pytest run over a small file, with the plugin only."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_p.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("config_kwargs", [{"r": 4}, {"r": 4, "alora_invocation_tokens": [1]}])
        def test_lora(config_kwargs):
            pass
    """))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "compat.plugin", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
         "--compat-out", str(out), "--compat-upstream", str(tmp_path / "none"), "--rootdir", str(tmp_path),
         "tests/test_p.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    selection = {row["verdict"]: row["count"] for row in json.loads((out / "selection.json").read_text())}
    assert selection == {KEPT: 1, "lora-variant:alora (param)": 1}
    assert list(json.loads((out / "results.json").read_text())) == ["tests/test_p.py::test_lora[config_kwargs0]"]
