"""`estimate_gradient(low_rank=k)` (issue 14): the streamed range finder on activations and output gradients gives
the exact mean gradient when k >= rank(G), never allocates a weight-sized tensor, and feeds the LoRA-GA init."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from peft import LoraGAConfig, get_peft_model
from peft.utils.lora_ga_utils import LoraGAContext, LowRankGradient, estimate_gradient

V, D, H, OUT = 23, 16, 14, 11  # vocab, embedding dim, hidden, Conv1D out


class Tiny(nn.Module):
    """Embedding -> Linear -> tanh -> Conv1D -> tanh -> Linear (logits), cross entropy; float64."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.lin = nn.Linear(D, H)
        self.proj = Conv1D(OUT, H)  # stored (in=H, out=OUT)
        self.head = nn.Linear(OUT, V)
        self.double()

    def forward(self, input_ids, labels):
        h = torch.tanh(self.proj(torch.tanh(self.lin(self.emb(input_ids)))))
        return nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def batches(n: int = 2, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randperm(V - 1, generator=gen)[:4].reshape(1, 4) + 1  # 4 distinct tokens: rank(G) <= 4n
        out.append({"input_ids": ids, "labels": torch.randint(0, V, (1, 4), generator=gen)})
    return out


def _assert_matches(low: dict, exact: dict) -> None:
    assert set(low) == set(exact)
    for name, grad in exact.items():
        approx = low[name]
        assert isinstance(approx, LowRankGradient) and approx.shape == tuple(grad.shape)
        assert torch.all(approx.S[:-1] >= approx.S[1:])
        torch.testing.assert_close(approx.to_dense().to(grad.dtype), grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("passes", [2, 3, 4])
def test_sketch_equals_exact_gradient_when_k_covers_the_rank(passes):
    model, data = Tiny(), batches()
    exact = estimate_gradient(model, data)
    low = estimate_gradient(model, data, low_rank=9, passes=passes)  # rank(G) <= 8 tokens < 9
    _assert_matches(low, exact)
    # the padding row gets no gradient, as in the exact path; top singular values agree
    for name, grad in exact.items():
        torch.testing.assert_close(low[name].S[:3], torch.linalg.svdvals(grad.double())[:3].to(low[name].S.dtype))


def test_hook_products_equal_delta_transpose_x_by_hand():
    model, data = Tiny(), batches(1)
    low = estimate_gradient(model, data, low_rank=8)
    acts = {}
    outs = {}

    def keep(name):
        def hook(module, args, out):
            acts[name], outs[name] = args[0], out
            out.retain_grad()

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in [("emb", model.emb), ("lin", model.lin),
                                                              ("proj", model.proj)]]
    model.emb.weight.requires_grad_(True)  # so that the embedding's output is part of the graph
    model(**data[0]).backward()
    for h in handles:
        h.remove()
    X = {n: a.reshape(-1, a.shape[-1]) for n, a in acts.items() if n != "emb"}
    delta = {n: o.grad.reshape(-1, o.shape[-1]) for n, o in outs.items()}
    torch.testing.assert_close(low["lin"].to_dense(), delta["lin"].T @ X["lin"])  # Linear: (out, in)
    torch.testing.assert_close(low["proj"].to_dense(), X["proj"].T @ delta["proj"])  # Conv1D: stored (in, out)
    ids = data[0]["input_ids"].flatten()
    one_hot = nn.functional.one_hot(ids, V).double() * (ids != 0).double().unsqueeze(1)
    torch.testing.assert_close(low["emb"].to_dense(), one_hot.T @ delta["emb"])  # Embedding rows at the ids


class _Shapes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # new memory, not views
                self.shapes.add(tuple(t.shape))
        return out


def test_no_weight_sized_tensor_and_no_weight_gradient():
    model, data = Tiny(), batches()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with _Shapes() as mode:
        low = estimate_gradient(model, data, low_rank=4, peft_config=LoraGAConfig(target_modules=["lin", "proj"]))
    weights = {tuple(model.lin.weight.shape), tuple(model.proj.weight.shape)}
    weights |= {s[::-1] for s in weights}
    assert not (mode.shapes & weights), mode.shapes & weights
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    for name in ("lin", "proj"):
        g = low[name]
        assert g.U.numel() + g.S.numel() + g.Vh.numel() == 4 * (sum(g.shape) + 1)


def test_frozen_model_and_generator_dataloader():
    model, data = Tiny(), batches(3)
    exact = estimate_gradient(model, data)
    model.requires_grad_(False)
    for passes in (2, 3):
        low = estimate_gradient(model, (b for b in data), low_rank=12, passes=passes)  # rank <= 12 tokens
        _assert_matches(low, exact)
    assert not any(p.requires_grad for p in model.parameters())
    low = estimate_gradient(model, iter(data), low_rank=9, iters=2)  # iters caps the cached batches
    _assert_matches(low, estimate_gradient(model, data[:2]))


def test_rejections():
    model, data = Tiny(), batches(1)
    with pytest.raises(ValueError, match="passes"):
        estimate_gradient(model, data, low_rank=4, passes=1)
    with pytest.raises(ValueError, match="low_rank"):
        estimate_gradient(model, data, low_rank=0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 1))
    with pytest.raises(ValueError, match="'0' is a Conv2d"):
        estimate_gradient(conv, [torch.randn(1, 2, 2, 2)], low_rank=2)


def _init(model, grads, r=2, direction="ArB2r", scale="stable"):
    config = LoraGAConfig(target_modules=["emb", "lin", "proj"], r=r, lora_alpha=4, direction=direction, scale=scale,
                          dtype="fp64")
    with LoraGAContext(model=model, named_grad=grads):
        peft_model = get_peft_model(model, config)
    return peft_model


def _factors(peft_model):
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[name] = (module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            out[name] = (module.lora_embedding_A["default"].detach(), module.lora_embedding_B["default"].detach())
    return out


def _same_up_to_signs(a, b, dim):
    """Equal up to the sign of each singular vector (rows of A, columns of B; dim: the vectors' dim)."""
    dots = (a * b).sum(dim)
    signs = torch.sign(dots)
    shaped = signs.unsqueeze(dim)
    torch.testing.assert_close(a, b * shaped, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "weightS"), ("A2rBr", "gd")])
def test_init_from_low_rank_gradient_matches_dense(direction, scale):
    model, data = Tiny(), batches()
    low = estimate_gradient(model, data, low_rank=9)
    # the dense G: the same values in fp64 (the exact path's fp32 sums equal them to ~1e-9, tested above)
    exact = {name: grad.to_dense() for name, grad in low.items()}
    dense_model = _init(copy.deepcopy(model), exact, direction=direction, scale=scale)
    low_model = _init(copy.deepcopy(model), low, direction=direction, scale=scale)
    fd, fl = _factors(dense_model), _factors(low_model)
    assert fd.keys() == fl.keys() and len(fd) == 3
    for name in fd:
        (Ad, Bd), (Al, Bl) = fd[name], fl[name]
        # Embedding's A is (r, vocab), its B (dim, r), in the transposed layout: vectors along the same dims
        _same_up_to_signs(Al, Ad, 1)
        _same_up_to_signs(Bl, Bd, 0)
    x = batches(1, seed=5)[0]
    torch.testing.assert_close(low_model(**x), model(**x))  # the offset keeps the output at init


def test_k_below_2r_is_refused_at_init():
    model, data = Tiny(), batches()
    low = estimate_gradient(model, data, low_rank=3)
    with pytest.raises(ValueError, match=r"k=3 < 2r=4"):
        _init(model, low, r=2)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_sketch(reentrant):
    """Checkpointed blocks run their forward twice (the recomputation in backward): each batch must still add to
    the sketch once, from the pass whose output gradient arrives (non-reentrant: the first; reentrant: the
    recomputation, the first runs without grad)."""
    from tests.tuners.loraga.helpers import llama, token_batches

    config = LoraGAConfig(r=2, iters=3, target_modules=["embed_tokens", "q_proj", "v_proj", "gate_proj", "down_proj"])
    data = token_batches(3)
    plain = estimate_gradient(llama(torch.float64), data, peft_config=config, low_rank=8, passes=3)
    model = llama(torch.float64)
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    calls = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    low = estimate_gradient(model, data, peft_config=config, low_rank=8, passes=3)
    handle.remove()
    assert len(calls) == 2 * 3 * 3  # checkpointing was on: 2 forwards per batch, 3 batches, 3 passes
    assert sorted(low) == sorted(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(low[name].to_dense(), grad.to_dense(), rtol=1e-10, atol=1e-14, msg=name)
    assert all(p.grad is None for p in model.parameters())


bnb = None
try:  # noqa: SIM105
    import bitsandbytes as bnb  # noqa: F811
except Exception:  # pragma: no cover
    pass


@pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_equals_the_dequantized_float_model(bits):
    from peft.tuners.loraga.quant import dequantize

    torch.manual_seed(0)
    float_weight = torch.randn(H, D) * 0.1
    if bits == 4:
        q = bnb.nn.Linear4bit(D, H, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(float_weight.clone(), requires_grad=False, quant_type="nf4", module=q)
    else:
        q = bnb.nn.Linear8bitLt(D, H, has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(float_weight.clone(), requires_grad=False, has_fp16_weights=False)
    q = q.to("cpu")
    model = nn.Sequential(q, nn.Tanh(), nn.Linear(H, 3))
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, D, generator=gen), torch.randn(4, 3, generator=gen)) for _ in range(2)]

    class Loss(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, y):
            return ((self.net(x) - y) ** 2).mean()

    low = estimate_gradient(Loss(model), data, low_rank=8)
    ref = nn.Sequential(nn.Linear(D, H), nn.Tanh(), copy.deepcopy(model[2]))
    with torch.no_grad():
        ref[0].weight.copy_(dequantize(q))
        ref[0].bias.copy_(q.bias)
    exact = estimate_gradient(Loss(ref), data)
    assert low["net.0"].shape == (H, D)
    assert torch.isfinite(low["net.0"].U).all() and torch.isfinite(low["net.0"].S).all()
    torch.testing.assert_close(low["net.0"].to_dense(), exact["net.0"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(low["net.2"].to_dense(), exact["net.2"], rtol=1e-4, atol=1e-6)


# --- 2 gloo processes (one spawn): DDP on a 2 + 1 split of the batches, FSDP2 on 2 + 2, equal one process ----------
WORLD = 2
LLAMA_CONFIG = dict(r=3, lora_alpha=6, iters=4, dtype="fp64",  # r=3: A's 3 rows shard unevenly (2 + 1)
                    target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"])  # embed_tokens: the root's shard


def _llama_peft(**changes):
    import warnings

    from tests.tuners.loraga.helpers import llama

    with warnings.catch_warnings():  # no gradients wait: LoRA's default init until initialise_adapter
        warnings.simplefilter("ignore")
        return get_peft_model(llama(torch.float64), LoraGAConfig(**{**LLAMA_CONFIG, **changes}))


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Full A, B and base weight of every target (gathers DTensors: a collective)."""
    out = {}
    for key, layer in model.base_model.adapter_layers("default"):
        if "default" in layer.lora_embedding_A:
            A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        else:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        for tag, t in (("A", A), ("B", B), ("W", layer.get_base_layer().weight)):
            out[f"{key}.{tag}"] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def _sharded(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _fsdp2_low_rank(rank: int) -> dict:
    """Inject, fully_shard, sketch on the sharded model (2 of the 4 batches per rank), initialise_adapter; then the
    same sketch into a second sharded model with scale="weightS" (each A, B on its owner, W gathered there)."""
    from tests.tuners.loraga.helpers import token_batches

    data = token_batches(4)
    model = _sharded(_llama_peft())
    ids = data[0]["input_ids"]
    before = model(input_ids=ids).logits.detach()
    low = estimate_gradient(model, data[2 * rank:2 * rank + 2], peft_config=LoraGAConfig(**LLAMA_CONFIG),
                            low_rank=8, passes=3)
    res = {"dense": {n: g.to_dense() for n, g in low.items()}, "types": {type(g).__name__ for g in low.values()}}
    model.base_model.initialise_adapter("default", low)
    res["init_diff"] = (model(input_ids=ids).logits.detach() - before).abs().max().item()
    res["local_A_rows"] = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight \
        .to_local().shape[0]
    res["snapshot"] = _snapshot(model)
    weight_s = _sharded(_llama_peft(scale="weightS"))
    weight_s.base_model.initialise_adapter("default", low)
    res["snapshot_weightS"] = _snapshot(weight_s)
    return res


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = Tiny()
        data = batches(3)
        mine = data[:2] if rank == 0 else data[2:]
        ddp = nn.parallel.DistributedDataParallel(model)
        result = {}
        for passes in (2, 3):
            low = estimate_gradient(ddp, mine, low_rank=12, passes=passes)
            result[passes] = {n: g.to_dense() for n, g in low.items()}
        owner = estimate_gradient(ddp, mine, low_rank=12, passes=3, reduce_to="owner")
        result["owner"] = (type(owner).__name__, {n: g.to_dense() for n, g in owner.items()})
        result["fsdp2"] = _fsdp2_low_rank(rank)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sketch_dist")
    out = str(tmp / "result")
    mp.spawn(_worker, args=(str(tmp / "init"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]


def test_ddp_equals_one_process(spawned):
    exact = estimate_gradient(Tiny(), batches(3))
    for passes in (2, 3):
        for rank in range(WORLD):
            for name, grad in exact.items():
                torch.testing.assert_close(spawned[rank][passes][name].to(grad.dtype), grad, rtol=1e-6, atol=1e-8)
    for rank in range(WORLD):  # reduce_to="owner": the small factors go to every rank alike (a plain dict)
        kind, owner = spawned[rank]["owner"]
        assert kind == "dict" and sorted(owner) == sorted(exact)
        for name, grad in owner.items():
            torch.testing.assert_close(grad, spawned[rank][3][name], rtol=0, atol=0)


def _assert_same(got: dict, want: dict, label: str) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-9, atol=1e-12 * max(value.abs().max().item(), 1.0),
                                   msg=f"{label} {name}")


def test_fsdp2_low_rank_init_equals_one_process(spawned):
    from tests.tuners.loraga.helpers import token_batches

    data, config = token_batches(4), LoraGAConfig(**LLAMA_CONFIG)
    model = _llama_peft()
    low = estimate_gradient(model, data, peft_config=config, low_rank=8, passes=3)
    model.base_model.initialise_adapter("default", low)
    weight_s = _llama_peft(scale="weightS")
    weight_s.base_model.initialise_adapter("default", low)
    single, single_weight_s = _snapshot(model), _snapshot(weight_s)
    assert len(single) == 3 * 7
    for rank in range(WORLD):
        res = spawned[rank]["fsdp2"]
        assert res["types"] == {"LowRankGradient"}
        _assert_same(res["dense"], {n: g.to_dense() for n, g in low.items()}, f"sketch rank {rank}")
        _assert_same(res["snapshot"], single, f"FSDP2 init rank {rank}")
        _assert_same(res["snapshot_weightS"], single_weight_s, f"FSDP2 weightS init rank {rank}")
        assert res["local_A_rows"] == (2 if rank == 0 else 1)  # A stays sharded: (3, 16) as 2 + 1 rows
        assert res["init_diff"] < 1e-12  # the sharded model's output is unchanged by the init
