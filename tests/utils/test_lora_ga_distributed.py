"""LoRA-GA on 2 processes (gloo, CPU; one spawn for every check): under FSDP2 and under DDP (`reduce_to="owner"`)
the init (A, B, offset base weights) equals one process on the same global batches; each rank holds 1/world of the
gradient sums (FSDP2: during the accumulation; DDP: after the reduction); bad setups raise clear errors."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from peft import LoraGAConfig, get_peft_model
from peft.utils import lora_ga_utils
from peft.utils.lora_ga_utils import LoraGAContext, OwnedGradients, estimate_gradient
from tests.tuners.loraga.helpers import llama, token_batches

WORLD = 2
# r=3: the (3, n) A factors shard unevenly (2 rows + 1 row); the embedding exercises the transposed (stored n x m) case
CONFIG = dict(r=3, lora_alpha=6, use_rslora=True, iters=4,
              target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"])
RTOL = 1e-5


def _config(**changes) -> LoraGAConfig:
    return LoraGAConfig(**{**CONFIG, **changes})


def _batches() -> list[dict]:
    return token_batches(4)


@contextlib.contextmanager
def _peak_sums():
    """Largest size in bytes of `estimate_gradient`'s running sums in this process, read after every hook call."""
    record = {"peak": 0}
    original = lora_ga_utils._Accumulator.hook

    def hook(self, param):
        original(self, param)
        record["peak"] = max(record["peak"], self.nbytes())

    lora_ga_utils._Accumulator.hook = hook
    try:
        yield record
    finally:
        lora_ga_utils._Accumulator.hook = original


def _held_bytes(grads: dict) -> int:
    """Bytes of the gradients this process holds (its local shards), each tensor once."""
    unique = {id(g): g.to_local() if hasattr(g, "to_local") else g for g in grads.values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


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


def _lora_ga_peft_model(**changes):
    with warnings.catch_warnings():  # no gradients wait: LoRA's default init until initialise_adapter
        warnings.simplefilter("ignore")
        return get_peft_model(llama(), _config(**changes))


def _fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (reported back to the test)
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _ddp(rank: int, batches: list[dict]) -> dict:
    """Uneven shares (1 and 3 batches), owner-only reduction, then LoraGAContext + get_peft_model."""
    model = llama()
    with _peak_sums() as peak:
        grads = estimate_gradient(model, batches[:1] if rank == 0 else batches[1:], peft_config=_config(),
                                  reduce_to="owner")
    res = {"peak": peak["peak"], "held": _held_bytes(grads), "owned": sorted(grads),
           "is_owned": isinstance(grads, OwnedGradients)}
    with LoraGAContext(model=model, named_grad=grads):
        peft = get_peft_model(model, _config())
    res["snapshot"] = _snapshot(peft)
    # the LoraGACallback order: inject first, estimate on the PeftModel (DDP-wrapped), initialise_adapter
    peft = _lora_ga_peft_model()
    grads = estimate_gradient(torch.nn.parallel.DistributedDataParallel(peft), batches[:1] if rank == 0 else
                              batches[1:], peft_config=_config(), reduce_to="owner")
    peft.base_model.initialise_adapter("default", grads)
    res["snapshot_inject_first"], res["grads"] = _snapshot(peft), grads
    return res


def _fsdp(rank: int, batches: list[dict]) -> dict:
    """Inject, fully_shard, estimate on the sharded model (2 batches per rank), initialise_adapter."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from peft.tuners.loraga.distributed import gather_to

    peft = _fsdp2(_lora_ga_peft_model())
    ids = batches[0]["input_ids"]
    before = peft(input_ids=ids).logits.detach()
    with _peak_sums() as peak:
        grads = estimate_gradient(peft, batches[2 * rank:2 * rank + 2], peft_config=_config())
    res = {"peak": peak["peak"], "held": _held_bytes(grads),
           "dtensor": all(type(g).__name__ == "DTensor" for g in grads.values())}
    peft.base_model.initialise_adapter("default", grads)
    res["init_max_abs_diff"] = (peft(input_ids=ids).logits.detach() - before).abs().max().item()
    q = peft.base_model.model.model.layers[0].self_attn.q_proj
    res["local_A_rows"] = q.lora_A["default"].weight.to_local().shape[0]
    res["snapshot"] = _snapshot(peft)
    # an uneven shard (5 rows on 2 ranks: 3 + 2) gathered onto rank 1 only
    full = torch.arange(15.0).reshape(5, 3)
    gathered = gather_to(distribute_tensor(full, init_device_mesh("cpu", (WORLD,)), [Shard(0)]), owner=1)
    res["gather_ok"] = torch.equal(gathered, full) if rank == 1 else gathered is None
    # full (unsharded) gradients into a sharded model, scale="weightS" (the owner gathers W as well)
    full_grads = estimate_gradient(llama(), batches, peft_config=_config())  # all 4 batches on each rank
    weight_s = _fsdp2(_lora_ga_peft_model(scale="weightS"))
    weight_s.base_model.initialise_adapter("default", full_grads)
    res["snapshot_weightS_full_grads"] = _snapshot(weight_s)
    res["model"] = peft
    return res


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    batches = _batches()
    try:
        res = {"ddp": _ddp(rank, batches), "fsdp": _fsdp(rank, batches)}
        fsdp1 = FullyShardedDataParallel(llama(), device_id=torch.device("cpu"))
        res["fsdp1_error"] = _error(lambda: estimate_gradient(fsdp1, batches[:1]))
        sharded, owned = res["fsdp"].pop("model"), res["ddp"].pop("grads")
        dist.destroy_process_group()
        res["no_group_error"] = _error(lambda: estimate_gradient(sharded, batches[:1]))
        res["owned_no_group_error"] = _error(lambda: _lora_ga_peft_model().base_model.initialise_adapter("default",
                                                                                                         owned))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process results (one spawn) and the single-process reference on all 4 batches."""
    tmp = tmp_path_factory.mktemp("lora_ga_distributed")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model = llama()
    with _peak_sums() as peak:
        grads = estimate_gradient(model, _batches(), peft_config=_config())
    with LoraGAContext(model=model, named_grad=grads):
        single = get_peft_model(model, _config())
    weight_s = _lora_ga_peft_model(scale="weightS")
    weight_s.base_model.initialise_adapter("default", grads)
    return {"ranks": ranks, "single": _snapshot(single), "single_bytes": peak["peak"],
            "single_weightS": _snapshot(weight_s)}


def _assert_same_init(got: dict, want: dict, label: str) -> float:
    """Each tensor within rtol 1e-5, with an absolute floor of 1e-5 of its largest entry (entries that cancel to
    ~0, in A's rows or in `W - s B A`, carry the rounding of the larger terms); returns the worst error relative to
    each tensor's largest entry."""
    assert sorted(got) == sorted(want)
    worst = 0.0
    for name, value in want.items():
        scale = value.abs().max().item()
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=RTOL * scale, msg=f"{label} {name}")
        worst = max(worst, (got[name] - value).abs().max().item() / scale)
    print(f"{label}: max |got - single| / max |single| = {worst:.2e}")
    return worst


def test_fsdp2_init_equals_one_process_and_ranks_hold_half_the_sums(runs):
    total = runs["single_bytes"]
    assert total == 4 * (64 * 16 + 2 * (16 * 16 + 8 * 16 + 16 * 32))  # fp32 sums of the 7 targets' weights
    for rank, res in enumerate(runs["ranks"]):
        fsdp = res["fsdp"]
        _assert_same_init(fsdp["snapshot"], runs["single"], f"FSDP2 rank {rank}")
        assert fsdp["dtensor"] and fsdp["peak"] == fsdp["held"] == total // WORLD, (fsdp["peak"], total)
        assert fsdp["local_A_rows"] == (2 if rank == 0 else 1)  # A and B stay sharded: (3, 16) as 2 + 1 rows
        assert fsdp["init_max_abs_diff"] < 1e-5  # the sharded model's output is unchanged by the init
        assert fsdp["gather_ok"]
        _assert_same_init(fsdp["snapshot_weightS_full_grads"], runs["single_weightS"], f"FSDP2 weightS rank {rank}")


def test_ddp_owner_reduction_equals_one_process_and_ranks_hold_their_share(runs):
    total, ranks = runs["single_bytes"], runs["ranks"]
    held = [res["ddp"]["held"] for res in ranks]
    assert sum(held) == total and max(held) <= total // WORLD + 4 * 64 * 16, held  # within one target of 1/world
    assert all(res["ddp"]["peak"] == total for res in ranks)  # before the reduction each rank sums whole gradients
    owned = [set(res["ddp"]["owned"]) for res in ranks]
    assert not owned[0] & owned[1] and len(owned[0] | owned[1]) == 7 and all(r["ddp"]["is_owned"] for r in ranks)
    for rank, res in enumerate(ranks):
        _assert_same_init(res["ddp"]["snapshot"], runs["single"], f"DDP rank {rank}")
        _assert_same_init(res["ddp"]["snapshot_inject_first"], runs["single"], f"DDP inject-first rank {rank}")


def test_bad_setups_raise_clear_errors(runs):
    for res in runs["ranks"]:
        assert res["fsdp1_error"].startswith("ValueError") and "FullyShardedDataParallel" in res["fsdp1_error"]
        assert "fully_shard" in res["fsdp1_error"]
        assert res["no_group_error"].startswith("RuntimeError") and "process group" in res["no_group_error"]
        assert "DTensor" in res["no_group_error"]
        assert res["owned_no_group_error"].startswith("RuntimeError") and "process group" in res["owned_no_group_error"]


def test_reduce_to_is_validated_and_single_process_owner_mode_is_the_plain_dict():
    with pytest.raises(ValueError, match="reduce_to='some'"):
        estimate_gradient(llama(), _batches()[:1], reduce_to="some")
    grads = estimate_gradient(llama(), _batches()[:1], peft_config=_config(), reduce_to="owner")
    assert type(grads) is dict and len(grads) == 7


def test_assign_owners_balances_by_size_and_is_deterministic():
    from peft.tuners.loraga.distributed import assign_owners

    sizes = {"a": 10, "b": 7, "c": 6, "d": 3, "e": 3}
    owners = assign_owners(sizes, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}  # loads 16 / 13, largest first
    assert assign_owners(dict(reversed(list(sizes.items()))), 2) == owners


if os.name == "nt":  # gloo file:// rendezvous and spawn are exercised on POSIX only
    pytestmark = pytest.mark.skip(reason="POSIX only")
