"""FSDP2 (2 processes, gloo): `fully_shard` makes the LoRA factors DTensor row shards; `LoraProAdamW` steps them
with only the r x r / r x n collectives its math needs, and must end where one process on the combined batch ends.

One spawn runs every check (starting processes is the slow part); the workers record values and error messages,
the tests compare them with one-process runs made here.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from peft import LoraConfig, LoraProConfig, get_peft_model
from peft.optimizers import LoraProAdamW, register_lorapro_adjustment
from tests.helpers.tiny_models import tiny_llama, token_ids

WORLD, STEPS, BATCH = 2, 3, 8
MODES = ("full", "efficient")

pytestmark = pytest.mark.skipif(os.name == "nt" or not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo (POSIX)")


class Block(nn.Module):
    """Odd sizes, so that the row shards are uneven: r = 3 rows split 2 / 1, m = 7 split 4 / 3."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(6, 7), nn.Linear(7, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net(mode: str) -> nn.Module:
    """LoRA-Pro on every block projection (random B: the first step is no special case), the head trained as a
    `modules_to_save` copy: a plain-AdamW parameter that FSDP2 shards too."""
    torch.manual_seed(0)
    config = LoraProConfig(r=3, lora_alpha=6, target_modules=["up", "down"], modules_to_save=["head"], mode=mode,
                           init_lora_weights=False)
    return get_peft_model(Net().double(), config)


def _batch(step: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=gen).to(dtype), torch.randn(BATCH, 3, generator=gen).to(dtype)


def _mse_step(model: nn.Module, opt, step: int, rank: int, world: int) -> None:
    x, y = _batch(step)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    opt.zero_grad()
    ((model(x[rows]) - y[rows]) ** 2).mean().backward()
    opt.step()


def _llama():
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    return get_peft_model(tiny_llama(), config)


def _llama_step(model: nn.Module, opt, step: int, rank: int, world: int) -> None:
    ids = token_ids(4, 8, seed=20 + step)[rank * 4 // world:(rank + 1) * 4 // world]
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _shard(model: nn.Module, blocks) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _moment_bytes(opt) -> int:
    from peft.optimizers.sharding import local

    return sum(local(st[k]).numel() * local(st[k]).element_size() for st in opt.state.values()
               for k in ("exp_avg", "exp_avg_sq") if k in st)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.base_model.model.blocks)


def _fsdp1(inner: bool) -> nn.Module:
    """FSDP1 with `use_orig_params=True`: the wrapper, or the model inside it (its factors are now 1-d views of each
    rank's piece of the flat parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = _net("full")
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    return model if inner else wrapped


def _fsdp1_flat_params() -> list[torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    wrapped = FullyShardedDataParallel(_net("full"), device_id=torch.device("cpu"),
                                       auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))  # uniform requires_grad each
    return [p for p in wrapped.parameters() if p.requires_grad]


def _shard_dim1() -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = _net("full")
    for block in _blocks(model):
        fully_shard(block, shard_placement_fn=lambda p: Shard(1) if p.dim() > 1 and p.shape[1] % 2 == 0 else Shard(0))
    fully_shard(model)
    _mse_step(model, LoraProAdamW(model, lr=1e-2), 0, dist.get_rank(), WORLD)


def _built_before_shard() -> None:
    model = _net("full")
    opt = LoraProAdamW(model, lr=1e-2)
    _shard(model, _blocks(model))
    _mse_step(model, opt, 0, dist.get_rank(), WORLD)


def _sharded_net(mode: str = "full") -> nn.Module:
    model = _net(mode)
    return _shard(model, _blocks(model))


ERROR_CASES = {
    "fsdp1": lambda: LoraProAdamW(_fsdp1(inner=False)),
    "fsdp1-inner": lambda: LoraProAdamW(_fsdp1(inner=True)),
    "fsdp1-flat": lambda: LoraProAdamW(_fsdp1_flat_params()),
    "shard-dim1": _shard_dim1,
    "built-before": _built_before_shard,
    "shard_moments": lambda: LoraProAdamW(_sharded_net(), shard_moments=True),
    "hook": lambda: register_lorapro_adjustment(torch.optim.SGD((m := _sharded_net()).parameters(), lr=0.1), m),
}


def _errors() -> dict[str, str]:
    """The message of each setup that must be refused ("no error" if it was not)."""
    out = {}
    for name, case in ERROR_CASES.items():
        try:
            case()
            out[name] = "no error"
        except Exception as error:  # the test names the expected type
            out[name] = f"{type(error).__name__}: {error}"
    return out


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loaded(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _dcp_state(model: nn.Module, opt) -> dict:
    """Model and optimizer as whole tensors through torch.distributed.checkpoint (as the Trainer saves them)."""
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True)
    return {"model": dcp.get_model_state_dict(model, options=options),
            "optimizer": dcp.get_optimizer_state_dict(model, opt, options=options)}


def _from_dcp_state(model: nn.Module, opt, state: dict) -> None:
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True)
    dcp.set_model_state_dict(model, state["model"], options=options)
    dcp.set_optimizer_state_dict(model, opt, state["optimizer"], options=options)


def _train_mode(mode: str, rank: int) -> dict:
    """3 steps under FSDP2, saving model and optimizer after 2, per rank (`state_dict()`: DTensors) and whole
    (torch.distributed.checkpoint); then fresh models and optimizers loaded from each redo step 3."""
    model = _sharded_net(mode)
    opt = LoraProAdamW(model, lr=1e-2, weight_decay=0.01)
    for step in range(STEPS):
        if step == STEPS - 1:
            checkpoint = _saved({"model": model.state_dict(), "optimizer": opt.state_dict()})
            whole = _saved(_dcp_state(model, opt))
        _mse_step(model, opt, step, rank, WORLD)
    resumed, resumed_dcp = _sharded_net(mode), _sharded_net(mode)
    state = _loaded(checkpoint)
    resumed.load_state_dict(state["model"])
    resumed_opt, dcp_opt = (LoraProAdamW(m, lr=1e-2, weight_decay=0.01) for m in (resumed, resumed_dcp))
    resumed_opt.load_state_dict(state["optimizer"])
    _from_dcp_state(resumed_dcp, dcp_opt, _loaded(whole))
    _mse_step(resumed, resumed_opt, STEPS - 1, rank, WORLD)
    _mse_step(resumed_dcp, dcp_opt, STEPS - 1, rank, WORLD)
    return {"trained": _whole(model), "resumed": _whole(resumed), "resumed_dcp": _whole(resumed_dcp),
            "moment_bytes": _moment_bytes(opt),
            "dtensor_state": all(type(st[k]).__name__ == "DTensor" for st in opt.state.values()
                                 for k in ("exp_avg", "exp_avg_sq") if k in st)}


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {mode: _train_mode(mode, rank) for mode in MODES}
        llama = _llama()
        _shard(llama, llama.base_model.model.model.layers)
        opt = LoraProAdamW(llama, lr=1e-3)
        for step in range(STEPS):
            _llama_step(llama, opt, step, rank, WORLD)
        results["llama"] = {"trained": _whole(llama)}
        results["errors"] = _errors()
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = str(tmp / "result")
    mp.spawn(_worker, args=(str(tmp / "init"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD)]


def _single(build, step_fn, lr: float, weight_decay: float = 0.0):
    """The weights after `STEPS` steps in one process, and the shapes of the optimizer's moments."""
    model = build()
    opt = LoraProAdamW(model, lr=lr, weight_decay=weight_decay)
    for step in range(STEPS):
        step_fn(model, opt, step, 0, 1)
    return _whole(model), [st[k].shape for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]


def _rows(d: int, rank: int) -> int:
    """Rows of a dimension of size d on `rank` (torch.chunk's split, as FSDP2's)."""
    chunk = -(-d // WORLD)
    return max(0, min(d, (rank + 1) * chunk) - rank * chunk)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_equals_one_process_on_the_combined_batch(runs, mode):
    single, _ = _single(lambda: _net(mode), _mse_step, 1e-2, 0.01)
    for rank, run in enumerate(runs):
        trained = run[mode]["trained"]
        assert trained.keys() == single.keys() and any("lora_B" in k for k in single)
        for name, value in single.items():
            torch.testing.assert_close(trained[name], value, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")


def test_fsdp2_fp32_llama_equals_one_process(runs):
    single, _ = _single(_llama, _llama_step, 1e-3)
    for name, value in single.items():
        torch.testing.assert_close(runs[0]["llama"]["trained"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_state_is_sharded_with_the_rows(runs, mode):
    """Each rank holds its rows of every moment (DTensors), full mode's (m, n) ones split like B's rows (m = 7 and
    6: 4 / 3 and 3 / 3): per rank, exactly those rows' bytes, together the unsharded state."""
    _, shapes = _single(lambda: _net(mode), _mse_step, 1e-2, 0.01)
    total = sum(8 * shape.numel() for shape in shapes)  # float64
    expected = [sum(8 * _rows(shape[0], rank) * shape[1:].numel() for shape in shapes) for rank in range(WORLD)]
    per_rank = [run[mode]["moment_bytes"] for run in runs]
    assert all(run[mode]["dtensor_state"] for run in runs)
    assert per_rank == expected and sum(per_rank) == total
    if mode == "full":  # the (m, n) moments dominate: about 1/world each
        assert max(per_rank) <= 0.6 * total, (per_rank, total)


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_checkpoint_resumes_exactly(runs, mode):
    """Per-rank `state_dict()` and whole state dicts through torch.distributed.checkpoint both resume exactly."""
    for run in runs:
        for name, value in run[mode]["trained"].items():
            torch.testing.assert_close(run[mode]["resumed"][name], value, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(run[mode]["resumed_dcp"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case, words", [
    ("fsdp1", ["FSDP1", "FullyShardedDataParallel", "fully_shard"]),
    ("fsdp1-inner", ["FSDP1", "use_orig_params", "fully_shard"]),
    ("fsdp1-flat", ["FSDP1", "FlatParameter", "fully_shard"]),
    ("shard-dim1", ["Shard(dim=1)", "Shard(0)", "shard_placement_fn"]),
    ("built-before", ["replaced after the optimizer was built", "after fully_shard"]),
    ("shard_moments", ["shard_moments", "DTensor"]),
    ("hook", ["register_lorapro_adjustment", "FSDP2", "LoraProAdamW"]),
])
def test_unsupported_setups_are_refused_clearly(runs, case, words):
    for run in runs:
        message = run["errors"][case]
        assert message.startswith("ValueError: ") and all(word in message for word in words), message



def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


def test_row_shard_arguments_in_one_process():
    """The math's row-shard arguments with one shard: `row_sum` the identity, `b_grams` the local `B^T B`, `a_rows`
    a slice of A (its moments those rows'): the rows of the whole step, bit for bit."""
    from peft.tuners.lorapro import math as lp

    gen = torch.Generator().manual_seed(3)
    A, B, gA, gB = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
                    ((2, 3, 6), (2, 7, 3), (2, 3, 6), (2, 7, 3)))
    args, hp, rows = (A, B, gA, gB, 2.0), lp.AdamHyper(lr=1e-2, weight_decay=0.01), slice(1, 3)
    shards = dict(g=lp.grams_batched([(A, B)], [1e-8], [lp.gram_b(B)])[0], row_sum=lambda t: t, a_rows=rows)
    full = [lp.full_mode_step(*args, [_zeros(7, 6) for _ in A], [_zeros(7, 6) for _ in A], 1, hp, "sylvester", 1e-8,
                              **kw) for kw in ({}, shards)]
    efficient = [lp.efficient_mode_step(*args, (_zeros(2, a, 6), _zeros(2, a, 6), _zeros(2, 7, 3), _zeros(2, 7, 3)),
                                        1, hp, "sylvester", 1e-8, **kw) for a, kw in ((3, {}), (2, shards))]
    for whole, part in (full, efficient):
        torch.testing.assert_close(part[0], whole[0][:, rows], rtol=0, atol=0)
        torch.testing.assert_close(part[1], whole[1], rtol=0, atol=0)
