"""LoRA on bitsandbytes-quantized tiny Llamas (QLoRA): forward, training, merge with settings kept, interop.

The base is a tiny Llama (hidden 64, MLP 128, 2 layers, vocab 128; every linear size a multiple of 64 so that
bitsandbytes' CPU repacking applies) saved once in fp32 and loaded with `BitsAndBytesConfig` on the CPU.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast")

from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.utils.quantization import dequantize_bnb_layer  # noqa: E402
from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TARGETS = 2 * len(TARGETS)
BF16 = torch.bfloat16

# name -> (BitsAndBytesConfig kwargs, the settings every quantized layer must have, before and after merging)
QUANT = {
    "nf4-fp32": ({"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
                 {"quant_type": "nf4", "compute_dtype": torch.float32, "double_quant": False}),
    "nf4-bf16-dq": ({"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": BF16, "bnb_4bit_use_double_quant": True},
                    {"quant_type": "nf4", "compute_dtype": BF16, "double_quant": True}),
    "fp4-fp32-dq": ({"bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32,
                     "bnb_4bit_use_double_quant": True},
                    {"quant_type": "fp4", "compute_dtype": torch.float32, "double_quant": True}),
    "fp4-bf16": ({"bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": BF16},
                 {"quant_type": "fp4", "compute_dtype": BF16, "double_quant": False}),
    "nf4-dq-bf16storage": ({"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32,
                            "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": BF16},
                           {"quant_type": "nf4", "compute_dtype": torch.float32, "double_quant": True,
                            "quant_storage": BF16}),
    "int8": ({}, {"threshold": 6.0, "has_fp16_weights": False}),
}


@pytest.fixture(scope="module")
def float_params(float_dir) -> int:
    return sum(p.numel() for p in LlamaForCausalLM.from_pretrained(float_dir).parameters())


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-fp32")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def quant_config(name: str) -> BitsAndBytesConfig:
    kwargs = QUANT[name][0]
    return BitsAndBytesConfig(load_in_8bit=True) if name == "int8" else BitsAndBytesConfig(load_in_4bit=True, **kwargs)


def load_quantized(float_dir: str, name: str, dtype=None) -> nn.Module:
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return LlamaForCausalLM.from_pretrained(float_dir, quantization_config=quant_config(name), device_map="cpu",
                                            **kwargs)


def input_ids(batch=2, length=12, seed=1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_adapter(model: nn.Module, seed: int = 0) -> PeftModel:
    """A LoRA with random A and B (B scaled so that `s B A` is about as large as W: 0.87 ||W||), on every linear."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        for _, layer in peft_model.base_model.tuner_layers():
            layer.lora_B["default"].weight.mul_(0.3)
    return peft_model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {k: m for k, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def raw_settings(layer: nn.Module) -> dict:
    """The layer's quantization settings read straight from bitsandbytes' objects (not through our helpers)."""
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return {"class": type(layer), "param": type(weight).__name__, "threshold": layer.state.threshold,
                "has_fp16_weights": layer.state.has_fp16_weights, "param_fp16_weights": weight.has_fp16_weights,
                "dtype": weight.dtype}
    state = weight.quant_state
    packed = getattr(state, "packing_format_for_cpu", False)
    return {
        "class": type(layer), "param": type(weight).__name__, "quant_type": state.quant_type,
        "param_quant_type": weight.quant_type, "blocksize": state.blocksize, "param_blocksize": weight.blocksize,
        "double_quant": state.original_nested if packed else state.nested,
        "param_double_quant": weight.compress_statistics, "quant_storage": weight.quant_storage,
        "compute_dtype": layer.compute_dtype, "weight_dtype": state.original_dtype if packed else state.dtype,
    }


def expected_settings(name: str, layer: nn.Module) -> dict:
    want = dict(QUANT[name][1])
    if name == "int8":
        return {"class": bnb.nn.Linear8bitLt, "param": "Int8Params", "threshold": want["threshold"],
                "has_fp16_weights": False, "param_fp16_weights": False, "dtype": torch.int8}
    storage = want.get("quant_storage", torch.uint8)
    return {
        "class": bnb.nn.Linear4bit, "param": "Params4bit", "quant_type": want["quant_type"],
        "param_quant_type": want["quant_type"], "blocksize": 64, "param_blocksize": 64,
        "double_quant": want["double_quant"], "param_double_quant": want["double_quant"], "quant_storage": storage,
        "compute_dtype": want["compute_dtype"], "weight_dtype": torch.float32,
    }


def dequantized_twin(peft_model: PeftModel, float_dir: str) -> PeftModel:
    """The float model with every quantized weight replaced by its dequantized value, carrying the same LoRA."""
    reference = LlamaForCausalLM.from_pretrained(float_dir)
    for key, layer in quantized_layers(peft_model.get_base_model()).items():
        owner = key.removesuffix(".base_layer")
        reference.get_submodule(owner).weight.data = dequantize_bnb_layer(layer)
    twin = get_peft_model(reference, copy.deepcopy(peft_model.peft_config["default"]))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(peft_model))
    return twin


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(QUANT))
def test_forward_equals_the_dequantized_reference(float_dir, float_params, name):
    model = load_quantized(float_dir, name)
    peft_model = make_adapter(model)
    layers = dict(peft_model.base_model.tuner_layers())
    expected_cls = lora_bnb.Linear8bitLt if name == "int8" else lora_bnb.Linear4bit
    assert len(layers) == N_TARGETS and all(type(m) is expected_cls for m in layers.values())
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in layers.values())
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert total == float_params + trainable  # 4-bit weights count as their unpacked sizes, whatever the storage dtype
    twin = dequantized_twin(peft_model, float_dir)
    ids = input_ids()
    # Train mode (dropout is 0): bitsandbytes dequantizes and multiplies, no CPU repacking, no int8 activations.
    peft_model.train(), twin.train()
    out, reference = logits(peft_model, ids), logits(twin, ids)
    with peft_model.disable_adapter():
        base = logits(peft_model, ids)
    tolerance = 2e-2 if QUANT[name][1].get("compute_dtype") == BF16 else 2e-5  # bf16 compute rounds activations
    assert max_rel(out, reference) < tolerance
    assert max_rel(base, reference) > 20 * tolerance  # the LoRA branch is large enough for the check to fail
    # Eval without grad: the inference path (4-bit: repacked weight, bf16 kernel; 8-bit: int8 activations).
    peft_model.eval(), twin.eval()
    assert max_rel(logits(peft_model, ids), logits(twin, ids)) < 4e-2
    if name != "int8" and bnb.functional.has_avx512bf16():
        assert all(m.get_base_layer().weight.quant_state.packing_format_for_cpu for m in layers.values())


@pytest.mark.parametrize("name", ["nf4-fp32", "int8"])
def test_all_linear_targets_every_quantized_layer_but_not_the_head(float_dir, name):
    model = load_quantized(float_dir, name)
    assert type(model.lm_head) is nn.Linear and len(quantized_layers(model)) == N_TARGETS  # the head stays float
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    wrapped = {k: type(m) for k, m in peft_model.base_model.tuner_layers()}
    expected_cls = lora_bnb.Linear8bitLt if name == "int8" else lora_bnb.Linear4bit
    assert len(wrapped) == N_TARGETS and set(wrapped.values()) == {expected_cls}
    assert type(peft_model.base_model.model.lm_head) is nn.Linear


def test_forward_keeps_a_bf16_input_dtype(float_dir):
    model = load_quantized(float_dir, "nf4-bf16-dq", dtype=BF16)
    peft_model = make_adapter(model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, dtype=BF16)
    y = layer(x)
    assert y.dtype == BF16 and layer.lora_A["default"].weight.dtype == torch.float32
    base = layer.get_base_layer()(x).float()
    lora = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
    torch.testing.assert_close(y.float(), (base + lora).to(BF16).float(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("name,checkpointing", [
    ("nf4-bf16-dq", "on"), ("nf4-bf16-dq", "off"), ("nf4-bf16-dq", "reentrant"), ("int8", "on"), ("int8", "off"),
])
def test_qlora_trains_after_prepare_model_for_kbit_training(float_dir, name, checkpointing):
    model = load_quantized(float_dir, name, dtype=BF16 if "bf16" in name else None)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": True}} if checkpointing == "reentrant" else {}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing != "off", **kwargs)
    checkpointing = checkpointing != "off"
    assert not any(p.requires_grad for p in model.parameters())
    # Input gradients are on with checkpointing (reentrant checkpointing needs them to reach the adapters).
    assert model.get_input_embeddings()(input_ids()).requires_grad == checkpointing
    plain = {n: p.dtype for n, p in model.named_parameters() if type(p) is nn.Parameter}
    assert plain and set(plain.values()) == {torch.float32}, plain  # norms, embeddings, head cast to fp32
    frozen = {k: m.weight.data.clone() for k, m in quantized_layers(model).items()}
    assert len(frozen) == N_TARGETS
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert len(params) == 2 * N_TARGETS
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids, losses = input_ids(batch=2, length=12), []
    for step in range(5):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:  # B starts at zero, so only B gets a gradient; every layer's must, through checkpointing
            for key, layer in peft_model.base_model.tuner_layers():
                assert layer.lora_B["default"].weight.grad.abs().sum() > 0, key
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for key, layer in quantized_layers(model).items():
        before = frozen[key.removesuffix(".base_layer")]
        assert torch.equal(layer.weight.data.view(torch.uint8), before.view(torch.uint8)), key


@pytest.mark.parametrize("name", ["nf4-fp32", "fp4-fp32-dq"])
def test_training_after_an_eval_pass_gets_the_same_gradients(float_dir, name):
    """On AVX512-BF16 CPUs an eval forward without grad repacks every 4-bit weight into a layout whose kernel has
    no backward; without restoring it, ~75% of the LoRA gradients' norm was wrong (measured) after one eval pass."""
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights")
    peft_model = make_adapter(load_quantized(float_dir, name))
    ids = input_ids()

    def gradients() -> dict[str, torch.Tensor]:
        peft_model.train()
        peft_model.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        return {k: p.grad.clone() for k, p in peft_model.named_parameters() if p.requires_grad}

    before = gradients()
    peft_model.eval()
    logits(peft_model, ids)  # eval pass: repacks the base weights
    layers = [m.get_base_layer() for _, m in peft_model.base_model.tuner_layers()]
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    after = gradients()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # The packed kernel rounds absmax to bf16 (and double quant re-nests it): gradients move by < 1-2%.
    for key, grad in before.items():
        assert (after[key] - grad).norm() < 0.05 * grad.norm(), key


def test_prepare_model_for_kbit_training_checks_its_model():
    plain = nn.Sequential(nn.Linear(4, 4).to(torch.float16))
    with pytest.raises(ValueError, match="use_gradient_checkpointing=True but Sequential"):
        prepare_model_for_kbit_training(plain)
    assert plain[0].weight.dtype == torch.float16 and plain[0].weight.requires_grad  # nothing changed on error
    prepare_model_for_kbit_training(plain, use_gradient_checkpointing=False, auto_clear_cache=False)  # upstream's
    assert plain[0].weight.dtype == torch.float32 and not plain[0].weight.requires_grad


@pytest.mark.parametrize("name", [n for n in QUANT if n != "fp4-bf16"])  # fp4 and bf16 compute: covered apart
def test_merge_unmerge_and_unload_keep_the_quantization_settings(float_dir, name, monkeypatch):
    peft_model = make_adapter(load_quantized(float_dir, name))
    peft_model.eval()
    ids = input_ids()
    adapter_out = logits(peft_model, ids)  # 4-bit layers are now in the CPU-packed layout (on AVX512-BF16 CPUs)
    with peft_model.disable_adapter():
        base_out = logits(peft_model, ids)
    layers = dict(peft_model.base_model.tuner_layers())
    settings = {k: raw_settings(m.get_base_layer()) for k, m in layers.items()}
    for key, layer in layers.items():
        assert settings[key] == expected_settings(name, layer.get_base_layer()), key
    weights = {k: dequantize_bnb_layer(m.get_base_layer()) for k, m in layers.items()}
    deltas = {k: m.get_delta_weight("default") for k, m in layers.items()}
    # Measured rounding: 4-bit ~0.09-0.12 ||W + d|| per requantization, int8 ~0.006. Bounds leave 2x room and stay
    # far below what a skipped or wrong-signed merge leaves (||d|| = 0.87 ||W||).
    bound = 0.02 if name == "int8" else 0.2

    monkeypatch.setattr(lora_bnb, "_ROUNDING_WARNED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model.merge_adapter()
    assert sum("requantized" in str(w.message) for w in caught) == 1  # once, not once per layer
    for key, layer in layers.items():
        assert raw_settings(layer.get_base_layer()) == settings[key], key
        merged = dequantize_bnb_layer(layer.get_base_layer())
        assert (merged - weights[key] - deltas[key]).norm() < bound * (weights[key] + deltas[key]).norm(), key
    merged_out = logits(peft_model, ids)
    assert (merged_out - adapter_out).abs().max() < 0.5 * (adapter_out - base_out).abs().max()

    peft_model.unmerge_adapter()
    for key, layer in layers.items():
        assert raw_settings(layer.get_base_layer()) == settings[key], key
        restored = dequantize_bnb_layer(layer.get_base_layer())
        assert (restored - weights[key]).norm() < 2 * bound * weights[key].norm(), key  # two roundings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unloaded = peft_model.merge_and_unload()
    assert not any("requantized" in str(w.message) for w in caught)
    assert isinstance(unloaded, LlamaForCausalLM)
    assert not any(isinstance(m, LoraLayer) for m in unloaded.modules())
    for key, layer in quantized_layers(unloaded).items():
        assert raw_settings(layer) == settings[key.removesuffix(".base_layer")] == settings[key], key
    assert (logits(unloaded, ids) - merged_out).abs().max() < 0.4 * (adapter_out - base_out).abs().max()


class _BareBnb(nn.Module):
    """Hand-built bitsandbytes layers with non-default settings transformers never produces (blocksize 128)."""

    def __init__(self):
        super().__init__()
        self.four = bnb.nn.Linear4bit(128, 128, compute_dtype=BF16, compress_statistics=True, quant_type="fp4",
                                      quant_storage=BF16)
        self.four.weight = bnb.nn.Params4bit(torch.randn(128, 128) * 0.05, requires_grad=False, blocksize=128,
                                             compress_statistics=True, quant_type="fp4", quant_storage=BF16,
                                             module=self.four)
        self.eight = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False, threshold=2.5)
        self.eight.weight = bnb.nn.Int8Params(torch.randn(64, 128) * 0.05, requires_grad=False,
                                              has_fp16_weights=False)
        # Float weight kept beside the int8 layers; not called (no CPU kernel for its eval forward in bitsandbytes).
        self.eight16 = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=True, threshold=4.0)

    def forward(self, x):
        return self.eight(self.four(x))


def test_merge_keeps_non_default_settings_on_hand_built_layers(monkeypatch):
    torch.manual_seed(0)
    model = _BareBnb().to("cpu")
    model.eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        model(x)  # repacks the 4-bit weight on AVX512-BF16 CPUs
    before = {k: raw_settings(m) for k, m in quantized_layers(model).items()}
    assert before["four"]["blocksize"] == 128 and before["eight"]["threshold"] == 2.5
    assert before["eight16"]["has_fp16_weights"] and before["eight16"]["dtype"] == torch.float32
    weights = {k: dequantize_bnb_layer(m) for k, m in quantized_layers(model).items()}
    targets = ["four", "eight", "eight16"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    deltas = {k: m.get_delta_weight("default") for k, m in peft_model.base_model.tuner_layers()}
    monkeypatch.setattr(lora_bnb, "_ROUNDING_WARNED", False)
    with pytest.warns(UserWarning, match="requantized"):
        unloaded = peft_model.merge_and_unload()
    assert {k: raw_settings(m) for k, m in quantized_layers(unloaded).items()} == before
    # The delta did land: exactly for the float 8-bit weight, up to one rounding for the others.
    torch.testing.assert_close(unloaded.eight16.weight.data, weights["eight16"] + deltas["eight16"])
    for key in ("four", "eight"):
        merged = dequantize_bnb_layer(getattr(unloaded, key))
        assert (merged - weights[key] - deltas[key]).norm() < 0.5 * deltas[key].norm(), key


def test_a_non_finite_merge_raises_and_changes_nothing(monkeypatch):
    torch.manual_seed(0)
    peft_model = get_peft_model(_BareBnb().to("cpu"), LoraConfig(r=4, target_modules=["four", "eight"]))
    monkeypatch.setattr(lora_bnb, "_ROUNDING_WARNED", True)
    for key, layer in peft_model.base_model.tuner_layers():
        base = layer.get_base_layer()
        before, settings = dequantize_bnb_layer(base), raw_settings(base)
        with torch.no_grad():
            layer.lora_B["default"].weight[0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"Merging adapters \['default'\] gives NaN/Inf.*nothing merged"):
            layer.merge()
        assert not layer.merged and layer.merged_adapters == [], key
        assert raw_settings(base) == settings, key
        torch.testing.assert_close(dequantize_bnb_layer(base), before, rtol=0, atol=0)


def test_an_unsupported_bitsandbytes_layer_is_refused_by_name_and_type():
    model = nn.Module()
    model.emb = bnb.nn.Embedding4bit(128, 64).to("cpu")
    model.proj = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"'emb' of type bitsandbytes\.nn\.modules\.Embedding4bit.*no LoRA layer"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["proj", "emb"]))
    assert type(model.proj) is nn.Linear and type(model.emb) is bnb.nn.Embedding4bit  # nothing injected


def test_peft_imports_and_runs_without_bitsandbytes():
    script = (
        "import sys\n"
        "import peft\n"
        "assert 'bitsandbytes' not in sys.modules, 'import peft imported bitsandbytes'\n"
        "sys.modules['bitsandbytes'] = None  # now any import of it fails\n"
        "import torch\n"
        "m = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peft.LoraConfig(target_modules=['0']))\n"
        "print(type(m.base_model.model[0]).__module__)\n"
        "print(type(m.merge_and_unload()[0]).__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["peft.tuners.lora.layer", "torch.nn.modules.linear"]


UPSTREAM_SCRIPT = r'''
import json, sys, torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

float_dir, ours_dir, up_dir, work = sys.argv[1:5]
quant = json.loads(open(work + "/quant.json").read())
quant["bnb_4bit_compute_dtype"] = getattr(torch, quant["bnb_4bit_compute_dtype"])
ids = torch.load(work + "/ids.pt")

def load(kind):
    if kind == "float":
        return LlamaForCausalLM.from_pretrained(float_dir)
    return LlamaForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(**quant),
                                            device_map="cpu")

def run(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()

out = {}
for kind in ("float", "4bit"):
    out["ours_on_" + kind] = run(PeftModel.from_pretrained(load(kind), ours_dir))
torch.manual_seed(1)
model = get_peft_model(load("4bit"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
model.save_pretrained(up_dir)
for kind in ("float", "4bit"):
    out["up_on_" + kind] = run(PeftModel.from_pretrained(load(kind), up_dir))
torch.save(out, work + "/upstream_logits.pt")
emit(sorted(out))
'''


def test_adapter_trained_on_4bit_loads_on_float_and_4bit_bases_here_and_upstream(float_dir, tmp_path):
    harness = pytest.importorskip("tests.upstream_harness")
    name = "nf4-bf16-dq"
    ids = input_ids()
    model = prepare_model_for_kbit_training(load_quantized(float_dir, name), use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    ours_dir = tmp_path / "ours"
    peft_model.save_pretrained(ours_dir)  # before any eval forward: the saved base layout is never touched
    trained = logits(peft_model.eval(), ids)
    with peft_model.disable_adapter():
        base_4bit = logits(peft_model, ids)
    assert max_rel(trained, base_4bit) > 1e-3  # the adapter matters: a lost or zeroed adapter would show

    def ours_on(kind: str, adapter_dir) -> torch.Tensor:
        base = LlamaForCausalLM.from_pretrained(float_dir) if kind == "float" else load_quantized(float_dir, name)
        return logits(PeftModel.from_pretrained(base, adapter_dir).eval(), ids)

    on_4bit, on_float = ours_on("4bit", ours_dir), ours_on("float", ours_dir)
    torch.testing.assert_close(on_4bit, trained, rtol=0, atol=1e-6)  # same 4-bit base, same adapter
    assert max_rel(on_float, trained) < 0.3  # the float base differs from the 4-bit one only by quantization
    # Upstream PEFT loads our adapter and computes the same logits; we load upstream's 4-bit adapter likewise.
    quant = {k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in QUANT[name][0].items()}
    (tmp_path / "quant.json").write_text(json.dumps({"load_in_4bit": True, **quant}))
    torch.save(ids, tmp_path / "ids.pt")
    up_dir = tmp_path / "upstream"
    try:
        harness.run_upstream(UPSTREAM_SCRIPT, args=[float_dir, str(ours_dir), str(up_dir), str(tmp_path)])
    except harness.UpstreamUnavailable as err:
        pytest.skip(f"upstream peft unavailable: {err}")
    upstream = torch.load(tmp_path / "upstream_logits.pt")
    torch.testing.assert_close(upstream["ours_on_4bit"], on_4bit, rtol=0, atol=1e-5)
    torch.testing.assert_close(upstream["ours_on_float"], on_float, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_on("4bit", up_dir), upstream["up_on_4bit"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_on("float", up_dir), upstream["up_on_float"], rtol=0, atol=1e-5)
