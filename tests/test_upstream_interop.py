"""Adapter files move both ways between this fork and the real upstream PEFT 0.21.2, with the same outputs.

One module-scoped fixture does all the work, so upstream is imported once (one subprocess, see
`tests/upstream_harness.py` and `tests/upstream_interop_script.py`):

1. each tiny base model is built with a fixed seed and written with `save_pretrained`; both processes load it from
   there, so the base weights are identical; the inputs go through a `torch.save` file;
2. this fork builds each case's LoRA model, adds seeded noise to every trainable tensor (`lora_B` nonzero, the
   `modules_to_save` head changed, trained biases changed) and saves the adapter;
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

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from tests.helpers.tiny_models import TINY_MODELS
from tests.upstream_harness import REPO_ROOT, UpstreamUnavailable, ensure_upstream_peft, run_upstream

pytestmark = pytest.mark.upstream

TOL = 1e-5
SCRIPT = Path(__file__).with_name("upstream_interop_script.py")
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForSequenceClassification",
                 "t5": "T5ForConditionalGeneration"}


@dataclass(frozen=True)
class Case:
    model: str
    config: dict = field(default_factory=dict)


CASES = {
    "llama_patterns": Case("llama", dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})),
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
        bias="all")),
    "t5_seq2seq": Case("t5", dict(
        task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, use_rslora=True, target_modules=["q", "v", "wo"])),
}
# Upstream features this fork does not implement: an upstream adapter using one must fail to load here, by name.
UNSUPPORTED = {
    "use_dora": dict(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], use_dora=True),
    "lora_bias": dict(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], lora_bias=True),
}


def load_base(spec: dict) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, spec["model_class"])
    return cls.from_pretrained(spec["base_dir"], dtype=torch.float32).eval()


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()  # a fresh get_peft_model is in training mode (lora_dropout active), as upstream's is
    with torch.no_grad():
        return model(**inputs).logits.detach().clone()


def perturb_trainable(model: torch.nn.Module, seed: int) -> None:
    """Add N(0, 0.1^2) noise to every trainable tensor (the upstream script does the same on its side)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
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
    ours_own: dict  # case -> logits of this fork's model that was saved


def _prepare_models(root: Path) -> dict:
    models = {}
    for name, model_class in MODEL_CLASSES.items():
        spec = TINY_MODELS[name]
        base_dir, inputs_path = root / "bases" / name, root / "bases" / f"{name}_inputs.pt"
        spec.build(dtype=torch.float32, seed=0).save_pretrained(base_dir)
        torch.save(spec.inputs(), inputs_path)
        models[name] = {"model_class": model_class, "base_dir": str(base_dir), "inputs": str(inputs_path)}
    return models


def _save_ours(case: dict, spec: dict) -> torch.Tensor:
    model = get_peft_model(load_base(spec), LoraConfig(**case["config"]))
    perturb_trainable(model, case["seed"])
    model.save_pretrained(case["ours_adapter"])
    return logits(model, torch.load(spec["inputs"], weights_only=True))


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
        entry = {"model": case.model, "config": case.config, "seed": seed, "dir": str(case_dir),
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


@pytest.mark.parametrize("name", CASES)
def test_our_adapter_in_upstream_gives_same_outputs(interop, name):
    case, spec = interop.manifest["cases"][name], interop.manifest["models"][CASES[name].model]
    ours = interop.ours_own[name]
    upstream = torch.load(Path(case["dir"]) / "up_on_ours.pt", weights_only=True)
    base = logits(load_base(spec), torch.load(spec["inputs"], weights_only=True))
    assert (ours - base).abs().max() > 1e-3, "the adapter must change the output, or this test cannot fail"
    assert (upstream - ours).abs().max().item() < TOL
    seen = interop.report["cases"][name]["ours_in_upstream"]
    assert seen["unexpected_keys"] == [] and seen["missing_adapter_keys"] == []
    assert seen["config_warnings"] == [], "upstream warned while reading our adapter_config.json"


@pytest.mark.parametrize("name", CASES)
def test_upstream_adapter_here_gives_same_outputs(interop, name):
    case, spec = interop.manifest["cases"][name], interop.manifest["models"][CASES[name].model]
    inputs = torch.load(spec["inputs"], weights_only=True)
    upstream_own = torch.load(Path(case["dir"]) / "up_own.pt", weights_only=True)
    base = load_base(spec)
    base_logits = logits(base, inputs)
    assert (torch.load(Path(case["dir"]) / "up_base.pt", weights_only=True) - base_logits).abs().max() < 1e-6
    assert (upstream_own - base_logits).abs().max() > 1e-3, "upstream's adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an upstream-written config at upstream defaults loads without a warning
        model = PeftModel.from_pretrained(base, case["up_adapter"])
    assert (logits(model, inputs) - upstream_own).abs().max().item() < TOL
    assert_same_scalings(scalings(model), interop.report["cases"][name]["upstream_own"]["scalings"])


@pytest.mark.parametrize("name", CASES)
def test_saved_tensors_have_upstreams_keys_and_shapes(interop, name):
    case = interop.manifest["cases"][name]
    ours, upstream = file_shapes(case["ours_adapter"]), file_shapes(case["up_adapter"])
    # Upstream also stores the base weights of a targeted embed_tokens / lm_head (save_embedding_layers="auto"), and
    # with bias="all" redundant `modules_to_save` / `original_module` copies of a head's bias; nothing else differs.
    extra = {k for k in set(upstream) - set(ours)
             if k.endswith("base_layer.weight") or ".original_module." in k or ".modules_to_save." in k}
    assert ours == {k: v for k, v in upstream.items() if k not in extra}
    assert all(k.startswith("base_model.model.") for k in ours)
    assert not [k for k in ours if ".default." in k or k.endswith(".default")], "adapter name must not be in keys"


@pytest.mark.parametrize("name", CASES)
def test_layer_scalings_match_upstream(interop, name):
    """rsLoRA and rank/alpha patterns resolve to the same (r, alpha, scaling) per layer in both packages."""
    report = interop.report["cases"][name]
    assert_same_scalings(report["ours_in_upstream"]["scalings"], report["upstream_own"]["scalings"])
    assert len(report["upstream_own"]["scalings"]) > 0


_MUST_MATCH = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
               "fan_in_fan_out", "bias", "layers_to_transform", "layers_pattern", "lora_dropout", "inference_mode")


@pytest.mark.parametrize("name", CASES)
def test_our_config_json_is_what_upstream_expects(interop, name):
    case = interop.manifest["cases"][name]
    ours, upstream = read_config(case["ours_adapter"]), read_config(case["up_adapter"])
    assert set(ours) <= set(interop.report["lora_fields"]), "keys upstream's LoraConfig does not know"
    assert isinstance(ours["target_modules"], (list, str)) and isinstance(ours["peft_version"], str)
    for key in ("base_model_name_or_path", "revision", "modules_to_save", "init_lora_weights", "exclude_modules"):
        assert key in ours
    for key in _MUST_MATCH:
        assert ours[key] == upstream[key], key
    if CASES[name].config["target_modules"] != "all-linear":  # upstream writes the expanded names, full paths
        same_targets = sorted(ours["target_modules"]) == sorted(upstream["target_modules"])
        assert same_targets or ours["target_modules"] == upstream["target_modules"]
    assert sorted(ours["modules_to_save"] or []) == sorted(set(upstream["modules_to_save"] or []))
    parsed = interop.report["cases"][name]["ours_in_upstream"]
    assert parsed["config_class"] == "LoraConfig"
    assert {k: parsed["config"][k] for k in _MUST_MATCH if k != "inference_mode"} == {
        k: ours[k] for k in _MUST_MATCH if k != "inference_mode"}


@pytest.mark.parametrize("name", CASES)
def test_upstream_config_reads_here_with_same_values(interop, name):
    folder = interop.manifest["cases"][name]["up_adapter"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = PeftConfig.from_pretrained(folder)
    assert isinstance(config, LoraConfig)
    upstream = read_config(folder)
    mine = config.to_dict()
    for key in _MUST_MATCH:
        if key != "inference_mode":
            assert mine[key] == upstream[key], key


@pytest.mark.parametrize("feature", UNSUPPORTED)
def test_upstream_adapter_with_missing_feature_fails_clearly(interop, feature):
    folder = Path(interop.manifest["unsupported"][list(UNSUPPORTED).index(feature)]["dir"])
    assert read_config(str(folder))[feature] is True  # upstream really wrote the feature
    base = load_base(interop.manifest["models"]["llama"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=feature):
        PeftModel.from_pretrained(base, str(folder))
    with pytest.raises(ValueError, match=feature):
        PeftConfig.from_pretrained(str(folder))
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
