"""Dequantize / requantize helpers on bare bitsandbytes layers (sizes are multiples of 64 for the CPU packing)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft.utils.quantization import (  # noqa: E402
    add_to_bnb_weight,
    bnb_quant_settings,
    dequantize_bnb_layer,
    dequantize_bnb_weight,
    replace_bnb_weight,
    requantize_bnb_weight,
    unpack_bnb_4bit_for_training,
)

IN, OUT = 128, 64
# Half the largest gap between neighbouring code values: the worst rounding of one value, relative to its absmax.
HALF_GAP = {"nf4": 0.153, "fp4": 0.167}


def make_4bit(quant_type="nf4", double_quant=False, storage=torch.uint8, blocksize=64, compute=torch.float32, seed=0):
    torch.manual_seed(seed)
    float_weight = torch.randn(OUT, IN) * 0.05
    layer = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=compute, compress_statistics=double_quant,
                              quant_type=quant_type, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(float_weight.clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=quant_type, quant_storage=storage,
                                     module=layer)
    torch.nn.init.normal_(layer.bias, std=0.1)
    return layer.to("cpu"), float_weight


def make_8bit(threshold=6.0, has_fp16_weights=False, seed=0):
    torch.manual_seed(seed)
    float_layer = torch.nn.Linear(IN, OUT)
    layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=has_fp16_weights, threshold=threshold)
    layer.load_state_dict(float_layer.state_dict())
    return layer.to("cpu"), float_layer.weight.detach().clone()


def eval_forward(layer, x):
    layer.eval()
    with torch.no_grad():
        return layer(x)


def packs_on_cpu() -> bool:
    return bool(bnb.functional.has_avx512bf16())


FOUR_BIT = [
    pytest.param("nf4", False, torch.uint8, 64, id="nf4"),
    pytest.param("nf4", True, torch.bfloat16, 64, id="nf4-dq-bf16storage"),
    pytest.param("fp4", True, torch.uint8, 128, id="fp4-dq-block128"),
    pytest.param("fp4", False, torch.bfloat16, 64, id="fp4-bf16storage"),
]


@pytest.mark.parametrize("quant_type,double_quant,storage,blocksize", FOUR_BIT)
def test_4bit_dequantize_matches_bitsandbytes_and_the_float_weight(quant_type, double_quant, storage, blocksize):
    layer, float_weight = make_4bit(quant_type, double_quant, storage, blocksize)
    weight = dequantize_bnb_layer(layer)
    expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert weight.dtype == torch.float32 and weight.shape == (OUT, IN)
    torch.testing.assert_close(weight, expected, rtol=0, atol=0)
    # Each value is within half a code gap of the original, relative to its block's absmax (+2% for double quant).
    blocks = float_weight.reshape(-1, blocksize)
    bound = HALF_GAP[quant_type] * blocks.abs().amax(1, keepdim=True) * 1.02
    assert ((weight.reshape(-1, blocksize) - blocks).abs() <= bound).all()


@pytest.mark.parametrize("quant_type,double_quant,storage,blocksize", FOUR_BIT)
def test_4bit_cpu_packing_is_undone_on_a_copy(quant_type, double_quant, storage, blocksize):
    if not packs_on_cpu():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights")
    layer, _ = make_4bit(quant_type, double_quant, storage, blocksize)
    before = dequantize_bnb_layer(layer)
    settings = bnb_quant_settings(layer)
    x = torch.randn(5, IN)
    y = eval_forward(layer, x)  # repacks the weight in place into the CPU-only layout
    state = layer.weight.quant_state
    assert state.packing_format_for_cpu
    packed_data = layer.weight.data.clone()
    after = dequantize_bnb_layer(layer)
    # Not mutated: still packed, same bytes, same state object; the settings read through the packing.
    assert state.packing_format_for_cpu and layer.weight.quant_state is state
    assert torch.equal(layer.weight.data, packed_data)
    assert bnb_quant_settings(layer) == settings
    # Same weight up to the bf16 rounding of absmax that the packing applies (2^-8 relative).
    torch.testing.assert_close(after, before, rtol=0, atol=before.abs().max().item() * 2**-8)
    # And it is the weight the packed kernel multiplies with (the kernel computes in bf16: ~1% error).
    reference = x @ after.T + layer.bias
    assert (y - reference).abs().max() <= 0.02 * reference.abs().max()
    # bitsandbytes' own inverse, applied in place as it does before saving, gives the same codes.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    codes, _ = _convert_weight_packed_for_cpu_inverse(layer.weight.data, layer.weight.quant_state)
    fresh, _ = make_4bit(quant_type, double_quant, storage, blocksize)
    assert torch.equal(codes.view(torch.uint8), fresh.weight.data.view(torch.uint8))


@pytest.mark.parametrize("quant_type,double_quant,storage,blocksize", FOUR_BIT)
def test_4bit_unpack_for_training_restores_a_differentiable_layer(quant_type, double_quant, storage, blocksize):
    if not packs_on_cpu():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights")
    layer, _ = make_4bit(quant_type, double_quant, storage, blocksize)
    assert not unpack_bnb_4bit_for_training(layer) and not unpack_bnb_4bit_for_training(torch.nn.Linear(2, 2))
    settings = bnb_quant_settings(layer)
    x = torch.randn(3, IN, requires_grad=True)
    eval_forward(layer, x.detach())  # packs
    packed_weight = dequantize_bnb_layer(layer)  # what the packed kernel multiplies with
    # Training on the packed layout (bitsandbytes 0.50) sends no gradient to x, or fails outright with a bias.
    layer.train()
    for _ in range(3):  # eval / train cycles do not drift
        assert unpack_bnb_4bit_for_training(layer)
        state = layer.weight.quant_state
        assert not state.packing_format_for_cpu and layer.quant_state is state
        assert state.nested == double_quant and layer.weight.dtype == storage
        assert bnb_quant_settings(layer) == settings
        weight = dequantize_bnb_layer(layer)
        # Exactly the packed weight; with double quant bitsandbytes re-nests absmax (8-bit, ~0.5% of it).
        tolerance = 0.0 if not double_quant else 0.006 * packed_weight.abs().max().item()
        torch.testing.assert_close(weight, packed_weight, rtol=0, atol=tolerance)
        y = layer(x)
        y.sum().backward()
        torch.testing.assert_close(y, x @ weight.T + layer.bias, rtol=0, atol=1e-5)
        torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x), rtol=0, atol=1e-5)
        x.grad = None
        eval_forward(layer, x.detach())
        assert layer.weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize("quant_type,double_quant,storage,blocksize", FOUR_BIT)
@pytest.mark.parametrize("packed", [False, True], ids=["canonical", "packed"])
def test_4bit_requantize_keeps_every_setting(quant_type, double_quant, storage, blocksize, packed):
    layer, _ = make_4bit(quant_type, double_quant, storage, blocksize, compute=torch.bfloat16)
    if packed:
        eval_forward(layer, torch.randn(2, IN))
    settings = bnb_quant_settings(layer)
    assert settings.quant_type == quant_type and settings.blocksize == blocksize
    assert settings.compress_statistics == double_quant and settings.quant_storage == storage
    assert settings.compute_dtype == torch.bfloat16 and settings.weight_dtype == torch.float32
    weight = dequantize_bnb_layer(layer)
    target = weight + 0.01 * torch.randn_like(weight)
    new = requantize_bnb_weight(layer, target)
    state = new.quant_state
    assert type(new).__name__ == "Params4bit" and new.dtype == storage and not new.requires_grad
    assert (new.quant_type, new.blocksize, new.compress_statistics, new.quant_storage) == (
        quant_type, blocksize, double_quant, storage)
    assert (state.quant_type, state.blocksize, state.nested, state.dtype) == (
        quant_type, blocksize, double_quant, torch.float32)
    replace_bnb_weight(layer, target)
    assert layer.weight is new or layer.weight.quant_state is layer.quant_state
    assert bnb_quant_settings(layer) == settings
    assert layer.compute_dtype == torch.bfloat16
    # Requantizing an already quantized weight is (near) lossless: only double quant re-rounds absmax.
    replace_bnb_weight(layer, weight)
    again = dequantize_bnb_layer(layer)
    tolerance = 0.0 if not double_quant and not packed else weight.abs().max().item() * 0.02
    torch.testing.assert_close(again, weight, rtol=0, atol=tolerance)


def test_8bit_dequantize_reads_scales_before_and_after_the_first_forward():
    layer, float_weight = make_8bit()
    before = dequantize_bnb_layer(layer)
    expected = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    torch.testing.assert_close(before, expected, rtol=1e-6, atol=0)
    row_max = float_weight.abs().amax(1, keepdim=True)
    assert ((before - float_weight).abs() <= row_max / 127 * 0.55).all()  # half a step (+ fp16 rounding)
    eval_forward(layer, torch.randn(3, IN))  # moves CB / SCB from the weight to layer.state
    assert layer.weight.SCB is None and layer.state.SCB is not None
    torch.testing.assert_close(dequantize_bnb_layer(layer), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="state=layer.state"):
        dequantize_bnb_weight(layer.weight)


@pytest.mark.parametrize("threshold,has_fp16_weights", [(6.0, False), (0.0, False), (3.0, True)])
def test_8bit_requantize_keeps_threshold_and_fp16_weights(threshold, has_fp16_weights):
    layer, _ = make_8bit(threshold, has_fp16_weights)
    settings = bnb_quant_settings(layer)
    assert (settings.threshold, settings.has_fp16_weights) == (threshold, has_fp16_weights)
    weight = dequantize_bnb_layer(layer)
    delta = 0.01 * torch.randn_like(weight)
    layer.train()
    layer(torch.randn(2, IN))  # caches int8 matrices on the state: they must not survive the replacement
    add_to_bnb_weight(layer, delta)
    assert bnb_quant_settings(layer) == settings
    assert layer.state.threshold == threshold and layer.state.has_fp16_weights == has_fp16_weights
    assert layer.weight.has_fp16_weights == has_fp16_weights
    assert layer.weight.dtype == (torch.float32 if has_fp16_weights else torch.int8)
    new = dequantize_bnb_layer(layer)
    step = (weight + delta).abs().amax(1, keepdim=True) / 127
    assert ((new - (weight + delta)).abs() <= step * 0.55).all()  # half a step (+ fp16 rounding)
    x = torch.randn(4, IN)
    # Train mode computes x @ dequant(W).T; with has_fp16_weights the float W is quantized on the fly first.
    # A stale cached int8 matrix would miss x @ delta.T (~0.1 per output).
    atol = 0.02 if has_fp16_weights else 1e-4
    torch.testing.assert_close(layer(x), x @ new.T + layer.bias, rtol=0, atol=atol)


def test_add_to_bnb_weight_rounds_once_and_refuses_non_finite_updates():
    layer, _ = make_4bit("nf4")
    weight = dequantize_bnb_layer(layer)
    delta = torch.zeros_like(weight)
    delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        add_to_bnb_weight(layer, delta)
    torch.testing.assert_close(dequantize_bnb_layer(layer), weight, rtol=0, atol=0)
    update = 0.02 * torch.randn_like(weight)
    exact = add_to_bnb_weight(layer, update)
    torch.testing.assert_close(exact, weight + update)
    add_to_bnb_weight(layer, update, sign=-1)
    back = dequantize_bnb_layer(layer)
    # The round trip only loses rounding error (nf4: ~7% of ||W|| per rounding); a wrong sign would leave 2 * update.
    assert (back - weight).norm() < 0.15 * weight.norm() < update.norm()
    with pytest.raises(ValueError, match="sign must be 1 or -1"):
        add_to_bnb_weight(layer, update, sign=2)


def test_helpers_reject_what_they_cannot_handle():
    with pytest.raises(ValueError, match="Linear4bit or Linear8bitLt.*torch.nn.modules.linear.Linear"):
        dequantize_bnb_layer(torch.nn.Linear(4, 4))
    layer, _ = make_4bit("nf4")
    with pytest.raises(ValueError, match=r"shape \(64, 64\).*\(64, 128\)"):
        requantize_bnb_weight(layer, torch.zeros(OUT, OUT))
    with pytest.raises(ValueError, match="Params4bit / Int8Params or a float weight"):
        dequantize_bnb_weight(torch.zeros(2, 2, dtype=torch.int32))
