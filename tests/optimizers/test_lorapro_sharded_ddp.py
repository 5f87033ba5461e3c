"""DDP with the optimizer state partitioned across the ranks (`LoraProAdamW(..., shard_moments=True)`, 2 processes,
gloo, float64): each rank steps the units it owns and broadcasts them, so training equals one process on the
combined batch, each rank holds about half the state, and a per-rank checkpoint resumes exactly.

One spawn runs every check; the tests compare what the workers recorded with one-process runs made here.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from peft.optimizers import LoraProAdamW
from tests.optimizers.test_lorapro_fsdp2 import MODES, STEPS, WORLD, _mse_step, _net, _whole

pytestmark = pytest.mark.skipif(os.name == "nt" or not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo (POSIX)")
KEYS = ("exp_avg", "exp_avg_sq")


def _moment_bytes(opt) -> int:
    return sum(st[k].numel() * st[k].element_size() for st in opt.state.values() for k in KEYS if k in st)


def _copy(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


def _ddp(mode: str) -> tuple[nn.Module, nn.Module]:
    model = _net(mode)
    return model, nn.parallel.DistributedDataParallel(model)


def _train(mode: str, rank: int, shard: bool, steps=range(STEPS), model=None, state=None):
    """`steps` of training from `_net(mode)` (or `model`, an optimizer `state` loaded); returns the model, the
    optimizer and the (model, optimizer) states saved before the last step."""
    model, ddp = _ddp(mode) if model is None else (model, nn.parallel.DistributedDataParallel(model))
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.01, shard_moments=shard)
    if state is not None:
        opt.load_state_dict(state)
    saved = None
    for step in steps:
        if step == STEPS - 1:
            saved = _copy((model.state_dict(), opt.state_dict()))
        _mse_step(ddp, opt, step, rank, WORLD)
    return model, opt, saved


def _refusal(fn) -> str:
    try:
        fn()
    except Exception as error:  # the test names the expected type
        return f"{type(error).__name__}: {error}"
    return "no error"


def _resume(mode: str, rank: int, saved) -> dict:
    """Step 3 redone from a checkpoint of steps 1-2; the refusals of checkpoints that do not fit."""
    model_state, opt_state = saved
    model = _net(mode)
    model.load_state_dict(model_state)
    resumed, _, _ = _train(mode, rank, True, steps=[STEPS - 1], model=model, state=opt_state)
    other_rank = _copy(opt_state)
    other_rank["shard_moments"]["rank"] = 1 - rank
    other_world = _copy(opt_state)
    other_world["shard_moments"]["world_size"] = 4
    sharded = LoraProAdamW(_net(mode), shard_moments=True)
    return {"resumed": _whole(resumed), "sharded_state": opt_state,
            "other_rank": _refusal(lambda: sharded.load_state_dict(other_rank)),
            "other_world": _refusal(lambda: sharded.load_state_dict(other_world))}


def _from_unsharded(mode: str, rank: int) -> dict:
    """Steps 1-2 with an unsharded optimizer, its state loaded into a sharded one for step 3."""
    _, _, (model_state, opt_state) = _train(mode, rank, False)
    model = _net(mode)
    model.load_state_dict(model_state)
    resumed, opt, _ = _train(mode, rank, True, steps=[STEPS - 1], model=model, state=opt_state)
    return {"from_unsharded": _whole(resumed), "owned_after_load": len(opt.state)}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for mode in MODES:
            model, opt, saved = _train(mode, rank, True)
            names = {id(p): n for n, p in model.named_parameters()}
            results[mode] = {"trained": _whole(model), "moment_bytes": _moment_bytes(opt),
                             "state_of": sorted(names[id(p)] for p in opt.state),
                             **_resume(mode, rank, saved), **_from_unsharded(mode, rank)}
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("sharded_ddp")
    out = str(tmp / "result")
    mp.spawn(_worker, args=(str(tmp / "init"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]


def _single(mode: str):
    model = _net(mode)
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.01)
    for step in range(STEPS):
        _mse_step(model, opt, step, 0, 1)
    return _whole(model), opt


def _assert_weights(got: dict, want: dict, msg: str, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert got.keys() == want.keys() and any("lora_B" in k for k in want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=rtol, atol=atol, msg=f"{msg}: {name}")


@pytest.mark.parametrize("mode", MODES)
def test_sharded_ddp_equals_one_process_on_the_combined_batch(runs, mode):
    single, _ = _single(mode)
    for rank, run in enumerate(runs):
        _assert_weights(run[mode]["trained"], single, f"rank {rank}")


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_holds_its_share_of_the_state(runs, mode):
    """Every unit's state lives on exactly one rank; in full mode the (m, n) moments, balanced by m n, split about
    evenly (four 7x6 / 6x7 pairs, two per rank, and the head on one)."""
    _, opt = _single(mode)
    total = _moment_bytes(opt)
    per_rank = [run[mode]["moment_bytes"] for run in runs]
    owned = [set(run[mode]["state_of"]) for run in runs]
    assert sum(per_rank) == total and not owned[0] & owned[1] and owned[0] | owned[1] == {
        name for name, p in _net(mode).named_parameters() if p.requires_grad and "lora_B" not in name
        or (mode == "efficient" and "lora_B" in name)}
    if mode == "full":
        assert max(per_rank) <= 0.55 * total, (per_rank, total)


@pytest.mark.parametrize("mode", MODES)
def test_sharded_checkpoint_resumes_exactly(runs, mode):
    for rank, run in enumerate(runs):
        _assert_weights(run[mode]["resumed"], run[mode]["trained"], f"rank {rank}", rtol=0, atol=0)
        _assert_weights(run[mode]["from_unsharded"], run[mode]["trained"], f"rank {rank}", rtol=0, atol=0)
        assert run[mode]["owned_after_load"] == len(run[mode]["state_of"])  # the others' entries dropped
        saved = run[mode]["sharded_state"]["shard_moments"]
        assert (saved["world_size"], saved["rank"]) == (WORLD, rank)


def test_mismatched_checkpoints_are_refused(runs):
    for run in runs:
        assert run["full"]["other_rank"].startswith("ValueError: ") and "each rank loads" in run["full"]["other_rank"]
        message = run["full"]["other_world"]
        assert message.startswith("ValueError: ") and "sharded over 4 ranks" in message and "on 2" in message
    with pytest.raises(ValueError, match=r"shard_moments=True\) on rank 0 of 2"):
        LoraProAdamW(_net("full")).load_state_dict(runs[0]["full"]["sharded_state"])


def test_shard_moments_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        LoraProAdamW(_net("full"), shard_moments=True)


def test_owners_balance_the_state_largest_first():
    from peft.optimizers.zero import assign_owners

    assert assign_owners([42, 42, 42, 42, 18, 3], 2) == [0, 1, 0, 1, 0, 1]
    assert assign_owners([5, 100, 5, 5], 3) == [1, 0, 2, 1]  # 100 alone; the 5s spread over the other ranks
    costs = [4096 * 4096] * 4 * 32 + [11008 * 4096] * 3 * 32  # Llama-2-7B's projections, full mode
    loads = [sum(c for c, k in zip(costs, assign_owners(costs, 8)) if k == rank) for rank in range(8)]
    assert max(loads) / (sum(costs) / 8) < 1.01
