"""Adapter files move both ways between this fork and the real upstream PEFT 0.21.2, with the same outputs.

One module-scoped fixture does all the work, so upstream is imported once (one subprocess, see
`tests/upstream_harness.py` and `tests/upstream_interop_script.py`):

1. each tiny base model is built with a fixed seed and written with `save_pretrained` (the plain `TinyNet` as
   `model.safetensors`); both processes load it from there, so the base weights are identical; the inputs go
   through a `torch.save` file;
2. this fork builds each case's LoRA model, adds seeded noise to every trainable tensor (`lora_B` nonzero, the
   `modules_to_save` head changed, trained biases changed) and saves the adapter (some cases: two adapters);
3. upstream loads that adapter and writes its logits, and saves its own adapter for the same config;
4. the tests compare: upstream on our adapter == ours, ours on upstream's adapter == upstream (max abs < 1e-5, fp32),
   the file keys and shapes, the JSON configs both ways, per-layer `(r, alpha, scaling)` (rsLoRA and patterns), and
   that upstream adapters using a feature this fork lacks fail to load with an error naming it.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from tests.helpers.tiny_models import TINY_MODELS, TinyNet
from tests.upstream_harness import REPO_ROOT, UpstreamUnavailable, ensure_upstream_peft, run_upstream

pytestmark = pytest.mark.upstream

TOL = 1e-5
SCRIPT = Path(__file__).with_name("upstream_interop_script.py")
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForSequenceClassification",
                 "t5": "T5ForConditionalGeneration", "custom": "TinyNet"}


@dataclass(frozen=True)
class Case:
    model: str
    config: dict = field(default_factory=dict)
    second: dict = field(default_factory=dict)  # a second adapter "second", saved in the sub-folder second/
    safetensors: bool = True  # False: this fork writes adapter_model.bin (torch.save) instead


CASES = {
    "llama_patterns": Case("llama", dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
        second=dict(task_type="CAUSAL_LM", r=2, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "gate_proj"])),
    "llama_rslora_regex": Case("llama", dict(
        task_type="CAUSAL_LM", r=8, lora_alpha=4, use_rslora=True, target_modules=r".*\.(k_proj|down_proj)",
        rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 16})),
    "llama_layers": Case("llama", dict(
        task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj"], layers_to_transform=[1],
        layers_pattern="layers")),
    "llama_all_linear": Case("llama", dict(task_type="CAUSAL_LM", r=2, lora_alpha=2, target_modules="all-linear")),
    "llama_embedding": Case("llama", dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "lm_head"])),
    "gpt2_conv1d": Case("gpt2", dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        bias="lora_only")),
    "bert_seq_cls": Case("bert", dict(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "bert_bias_all": Case("bert", dict(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "key"], modules_to_save=["classifier"],
        bias="all"), safetensors=False),
    "t5_seq2seq": Case("t5", dict(
        task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, use_rslora=True, target_modules=["q", "v", "wo"])),
    "custom_conv2d_embedding": Case("custom", dict(
        r=2, lora_alpha=4, target_modules=["emb", "conv", "lin1"], modules_to_save=["lin2"])),
}
# Upstream features this fork does not implement: an upstream adapter using one must fail to load here, by name.
UNSUPPORTED = {
    "layer_replication": dict(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], layer_replication=[[0, 1]]),
    "use_qalora": dict(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], use_qalora=True),
}


def load_base(spec: dict) -> torch.nn.Module:
    import transformers

    if spec["model_class"] == "TinyNet":
        model = TinyNet()
        model.load_state_dict(load_file(os.path.join(spec["base_dir"], "model.safetensors")))
        return model.eval()
    cls = getattr(transformers, spec["model_class"])
    return cls.from_pretrained(spec["base_dir"], dtype=torch.float32).eval()


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()  # a fresh get_peft_model is in training mode (lora_dropout active), as upstream's is
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out).detach().clone()


def perturb(model: torch.nn.Module, seed: int, adapter: str = "") -> None:
    """Add N(0, 0.1^2) noise to every trainable tensor, or with `adapter` to every tensor of that adapter (the
    upstream script does the same on its side)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if (f".{adapter}." in name) if adapter else param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))


def scalings(model: torch.nn.Module, adapter: str = "default") -> dict:
    return {name: [module.r[adapter], module.lora_alpha[adapter], module.scaling[adapter]]
            for name, module in model.named_modules() if isinstance(module, LoraLayer) and adapter in module.r}


def assert_same_scalings(got: dict, expected: dict) -> None:
    """Same adapted layers, each with the same `(r, alpha)` and a scaling equal to 1e-12 relative."""
    assert sorted(got) == sorted(expected)
    for name, (r, alpha, scaling) in expected.items():
        assert got[name][:2] == [r, alpha], name
        assert got[name][2] == pytest.approx(scaling, rel=1e-12), name


def file_shapes(folder: str) -> dict[str, tuple]:
    if not os.path.exists(os.path.join(folder, "adapter_model.safetensors")):
        state = torch.load(os.path.join(folder, "adapter_model.bin"), weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f)


@dataclass
class Interop:
    root: Path
    manifest: dict
    report: dict
    ours_own: dict  # case -> adapter name -> logits of this fork's model that was saved


def _prepare_models(root: Path) -> dict:
    models = {}
    for name, model_class in MODEL_CLASSES.items():
        spec = TINY_MODELS[name]
        base_dir, inputs_path = root / "bases" / name, root / "bases" / f"{name}_inputs.pt"
        model = spec.build(dtype=torch.float32, seed=0)
        if isinstance(model, TinyNet):
            base_dir.mkdir(parents=True)
            save_file(model.state_dict(), str(base_dir / "model.safetensors"))
        else:
            model.save_pretrained(base_dir)
        torch.save(spec.inputs(), inputs_path)
        models[name] = {"model_class": model_class, "base_dir": str(base_dir), "inputs": str(inputs_path)}
    return models


def _save_ours(case: dict, spec: dict) -> dict[str, torch.Tensor]:
    inputs = torch.load(spec["inputs"], weights_only=True)
    model = get_peft_model(load_base(spec), LoraConfig(**case["config"]))
    perturb(model, case["seed"])
    out = {"default": logits(model, inputs)}
    if case["second"]:
        model.add_adapter("second", LoraConfig(**case["second"]))
        perturb(model, case["seed"] + 100, adapter="second")
        model.set_adapter("second")
        out["second"] = logits(model, inputs)
        model.set_adapter("default")
    model.save_pretrained(case["ours_adapter"], safe_serialization=case["safetensors"])
    return out


@pytest.fixture(scope="module")
def interop(tmp_path_factory) -> Interop:
    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:
        if os.environ.get("PEFT_UPSTREAM_OPTIONAL") == "1":
            pytest.skip(f"upstream peft unavailable: {exc}")
        raise
    root = tmp_path_factory.mktemp("interop")
    manifest = {"models": _prepare_models(root), "cases": {}, "unsupported": []}
    ours_own = {}
    for seed, (name, case) in enumerate(CASES.items(), start=1):
        case_dir = root / name
        entry = {"model": case.model, "config": case.config, "second": case.second, "seed": seed,
                 "safetensors": case.safetensors, "dir": str(case_dir),
                 "ours_adapter": str(case_dir / "ours"), "up_adapter": str(case_dir / "upstream")}
        manifest["cases"][name] = entry
        ours_own[name] = _save_ours(entry, manifest["models"][case.model])
    for feature, config in UNSUPPORTED.items():
        manifest["unsupported"].append({"model": "llama", "config": config, "dir": str(root / "unsupported" / feature)})
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report = run_upstream(SCRIPT, args=[str(root)], timeout=240).data
    return Interop(root, manifest, report, ours_own)


def test_subprocess_ran_upstream_not_this_repo(interop):
    report = interop.report
    assert report["peft_version"] == "0.21.2"
    assert os.path.realpath(report["peft_file"]).startswith(str(ensure_upstream_peft()) + os.sep)
    assert str(REPO_ROOT) not in [os.path.realpath(p or ".") for p in report["sys_path"]]
    assert os.path.realpath(report["sys_path"][1]) == str(ensure_upstream_peft())  # first after the script's folder


def _outputs(case: dict, stem: str) -> dict[str, torch.Tensor]:
    """The logits the upstream side wrote for `stem` ("up_on_ours" or "up_own"), per adapter name."""
    out = {"default": torch.load(Path(case["dir"]) / f"{stem}.pt", weights_only=True)}
    if case["second"]:
        out["second"] = torch.load(Path(case["dir"]) / f"{stem}_second.pt", weights_only=True)
    return out


@pytest.mark.parametrize("name", CASES)
def test_our_adapter_in_upstream_gives_same_outputs(interop, name):
    case, spec = interop.manifest["cases"][name], interop.manifest["models"][CASES[name].model]
    base = logits(load_base(spec), torch.load(spec["inputs"], weights_only=True))
    upstream = _outputs(case, "up_on_ours")
    assert sorted(upstream) == sorted(interop.ours_own[name])
    for adapter, ours in interop.ours_own[name].items():
        assert (ours - base).abs().max() > 1e-3, f"{adapter}: the adapter must change the output, or no test"
        assert (upstream[adapter] - ours).abs().max().item() < TOL, adapter
    seen = interop.report["cases"][name]["ours_in_upstream"]
    assert seen["unexpected_keys"] == [] and seen["missing_adapter_keys"] == []
    assert seen["config_warnings"] == [], "upstream warned while reading our adapter_config.json"


@pytest.mark.parametrize("name", CASES)
def test_upstream_adapter_here_gives_same_outputs(interop, name):
    case, spec = interop.manifest["cases"][name], interop.manifest["models"][CASES[name].model]
    inputs = torch.load(spec["inputs"], weights_only=True)
    upstream_own, report = _outputs(case, "up_own"), interop.report["cases"][name]["upstream_own"]
    base = load_base(spec)
    base_logits = logits(base, inputs)
    assert (torch.load(Path(case["dir"]) / "up_base.pt", weights_only=True) - base_logits).abs().max() < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an upstream-written config at upstream defaults loads without a warning
        model = PeftModel.from_pretrained(base, case["up_adapter"])
        if case["second"]:
            model.load_adapter(os.path.join(case["up_adapter"], "second"), adapter_name="second")
    for adapter, expected in upstream_own.items():
        assert (expected - base_logits).abs().max() > 1e-3, f"{adapter}: upstream's adapter must change the output"
        model.set_adapter(adapter)
        assert (logits(model, inputs) - expected).abs().max().item() < TOL, adapter
    assert_same_scalings(scalings(model), report["scalings"])
    if case["second"]:
        assert_same_scalings(scalings(model, "second"), report["scalings_second"])


def _adapter_folders(case: dict) -> list[tuple[str, str, str]]:
    """(adapter, our folder, upstream's folder): "default" at the top, others in a sub-folder of their name."""
    out = [("default", case["ours_adapter"], case["up_adapter"])]
    if case["second"]:
        out.append(("second", os.path.join(case["ours_adapter"], "second"), os.path.join(case["up_adapter"], "second")))
    return out


@pytest.mark.parametrize("name", CASES)
def test_saved_tensors_have_upstreams_keys_and_shapes(interop, name):
    for adapter, our_folder, up_folder in _adapter_folders(interop.manifest["cases"][name]):
        ours, upstream = file_shapes(our_folder), file_shapes(up_folder)
        # Upstream also stores the base weights of a targeted embed_tokens / lm_head (save_embedding_layers="auto"),
        # and with bias="all" redundant `modules_to_save` / `original_module` copies of a head's bias; that is all.
        extra = {k for k in set(upstream) - set(ours)
                 if k.endswith("base_layer.weight") or ".original_module." in k or ".modules_to_save." in k}
        assert ours == {k: v for k, v in upstream.items() if k not in extra}, adapter
        assert all(k.startswith("base_model.model.") for k in ours)
        assert not [k for k in ours if f".{adapter}." in k or k.endswith(f".{adapter}")], "adapter name in keys"


@pytest.mark.parametrize("name", CASES)
def test_layer_scalings_match_upstream(interop, name):
    """rsLoRA and rank/alpha patterns resolve to the same (r, alpha, scaling) per layer in both packages."""
    report = interop.report["cases"][name]
    assert_same_scalings(report["ours_in_upstream"]["scalings"], report["upstream_own"]["scalings"])
    assert_same_scalings(report["ours_in_upstream"]["scalings_second"], report["upstream_own"]["scalings_second"])
    assert len(report["upstream_own"]["scalings"]) > 0


_MUST_MATCH = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
               "fan_in_fan_out", "bias", "layers_to_transform", "layers_pattern", "lora_dropout", "inference_mode")


@pytest.mark.parametrize("name", CASES)
def test_our_config_json_is_what_upstream_expects(interop, name):
    case = interop.manifest["cases"][name]
    for adapter, our_folder, up_folder in _adapter_folders(case):
        ours, upstream = read_config(our_folder), read_config(up_folder)
        given = case["config"] if adapter == "default" else case["second"]
        assert set(ours) <= set(interop.report["lora_fields"]), "keys upstream's LoraConfig does not know"
        assert ours["peft_type"] == "LORA" and ours["task_type"] == given.get("task_type")
        assert isinstance(ours["peft_version"], str) and ours["inference_mode"] is True
        for key in ("base_model_name_or_path", "revision", "modules_to_save", "init_lora_weights", "exclude_modules"):
            assert key in ours
        for key in _MUST_MATCH:
            assert ours[key] == upstream[key], (adapter, key)
        if isinstance(given["target_modules"], list):
            assert isinstance(ours["target_modules"], list)
            expected = sorted(given["target_modules"])
            assert sorted(ours["target_modules"]) == sorted(upstream["target_modules"]) == expected
        elif given["target_modules"] != "all-linear":  # upstream writes all-linear expanded to module paths
            assert ours["target_modules"] == upstream["target_modules"] == given["target_modules"]
        assert sorted(ours["modules_to_save"] or []) == sorted(set(upstream["modules_to_save"] or []))
    parsed = interop.report["cases"][name]["ours_in_upstream"]
    assert parsed["config_class"] == "LoraConfig"
    assert {k: parsed["config"][k] for k in _MUST_MATCH if k != "inference_mode"} == {
        k: read_config(case["ours_adapter"])[k] for k in _MUST_MATCH if k != "inference_mode"}


@pytest.mark.parametrize("name", CASES)
def test_upstream_config_reads_here_with_same_values(interop, name):
    for _, _, folder in _adapter_folders(interop.manifest["cases"][name]):
        upstream = read_config(folder)
        assert upstream["use_dora"] is False and "loftq_config" in upstream  # upstream-only fields, at defaults
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config = PeftConfig.from_pretrained(folder)
        assert isinstance(config, LoraConfig)
        mine = config.to_dict()
        for key in _MUST_MATCH:
            if key != "inference_mode":
                assert mine[key] == upstream[key], key


def test_unknown_key_from_a_newer_upstream_is_dropped_with_a_warning(interop, tmp_path):
    data = read_config(interop.manifest["cases"]["llama_patterns"]["up_adapter"])
    data["a_field_from_peft_9"] = {"x": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="a_field_from_peft_9"):
        config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, LoraConfig) and config.rank_pattern == data["rank_pattern"]


@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_upstream_adapter_with_missing_feature_fails_clearly(interop, feature):
    folder = Path(interop.manifest["unsupported"][list(UNSUPPORTED).index(feature)]["dir"])
    assert read_config(str(folder))[feature] not in (None, False)  # upstream really wrote the feature
    base = load_base(interop.manifest["models"]["llama"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=feature):
        PeftModel.from_pretrained(base, str(folder))
    with pytest.raises(ValueError, match=feature):
        PeftConfig.from_pretrained(str(folder))
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
