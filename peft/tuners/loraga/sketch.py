"""LoRA-GA gradient estimation without any m x n gradient: a streamed randomized range finder (Halko, Martinsson,
Tropp 2011, algorithms 4.1 / 4.3) fed by the layers' inputs X and output gradients delta.

For a Linear with input X (tokens x n) and output gradient delta (tokens x m) one batch's weight gradient is
`delta^T X` (m x n); a Conv1D stores `X^T delta` (n x m); an Embedding `one_hot(ids)^T delta` (a sparse row
update). Writing each as `G = L^T R` (stored layout, rows x cols), the products with a thin matrix never need G:

    G P   = L^T (R P)      (P: cols x k)        G^T Q = R^T (L Q)      (Q: rows x k)

Each pass over the estimation batches computes one such product (summed over batches, averaged like the exact
path, summed across processes): pass 1 `Y = G Omega` (Omega Gaussian), pass 2 `Z = G^T orth(Y)`, pass 3
`G orth(Z)`, ... The last product gives the factorisation: `G ~ Q Q^T G = Q Z^T` after an even number of passes,
`G ~ G P P^T = Y P^T` after an odd one; a QR and the SVD of a k x k matrix give `G ~ U S Vh`, exact when
`k >= rank(G)`. Nothing of size m x n is ever allocated: per target the sketch holds k(m + n) numbers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import quant
from .init_math import one_cpu_thread


@dataclass
class LowRankGradient:
    """`G ~ U diag(S) Vh` (the mean gradient over the estimation batches) in the stored weight's layout: `U`
    (shape[0] x k), `S` (k, descending, >= 0), `Vh` (k x prod(shape[1:])); `U` and `Vh` orthonormal."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    shape: tuple

    @property
    def rank(self) -> int:
        return self.S.shape[0]

    def to_dense(self) -> torch.Tensor:
        return ((self.U * self.S) @ self.Vh).reshape(self.shape)

    def to(self, *args, **kwargs) -> "LowRankGradient":
        return LowRankGradient(self.U.to(*args, **kwargs), self.S.to(*args, **kwargs), self.Vh.to(*args, **kwargs),
                               self.shape)

    def matrix_factors(self, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, Vh of the (m, n) = (out, in) matrix `model.to_matrix` makes of the gradient (Conv1D and Embedding
        store it transposed)."""
        if kind in ("conv1d", "embedding"):
            return self.Vh.T, self.S, self.U.T
        return self.U, self.S, self.Vh.reshape(self.rank, -1)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    return "linear"


def _shape(module: nn.Module) -> tuple:
    if quant.is_quantized(module):
        return (module.out_features, module.in_features)
    return tuple(module.weight.shape)


class _Target:
    """The running product of one target layer with the current thin basis (see the module docstring)."""

    def __init__(self, name: str, module: nn.Module, k: int, seed: int, dtype: torch.dtype) -> None:
        self.name, self.module, self.kind = name, module, _kind(module)
        self.shape = _shape(module)
        self.rows, self.cols = self.shape[0], math.prod(self.shape[1:])
        self.k, self.dtype = min(k, self.rows, self.cols), dtype
        gen = torch.Generator().manual_seed(seed)
        self.basis = torch.randn(self.cols, self.k, generator=gen, dtype=torch.float64).to(dtype)  # Omega
        self.right = True  # True: this pass sums G @ basis (rows x k); False: G^T @ basis (cols x k)
        self.sum: Optional[torch.Tensor] = None
        self.last: Optional[torch.Tensor] = None  # the previous pass's basis (for the final factorisation)

    # L and R of G = L^T R per kind, as (tokens x rows) / (tokens x cols) actions
    def add(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        basis = self.basis.to(delta.device)
        if self.kind == "embedding":
            ids = x.reshape(-1)
            delta = delta.reshape(-1, delta.shape[-1]).to(self.dtype)
            if self.module.padding_idx is not None:
                delta = delta * (ids != self.module.padding_idx).unsqueeze(1).to(delta.dtype)
            if self.right:  # one_hot^T (delta basis): rows of delta basis added at ids
                part = torch.zeros(self.rows, self.k, dtype=self.dtype, device=delta.device)
                part.index_add_(0, ids, delta @ basis)
            else:  # delta^T (one_hot basis) = delta^T basis[ids]
                part = delta.T @ basis[ids]
        else:
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)
            delta = delta.reshape(-1, delta.shape[-1]).to(self.dtype)
            L, R = (delta, x) if self.kind == "linear" else (x, delta)
            part = L.T @ (R @ basis) if self.right else R.T @ (L @ basis)
        part = part.to(self.sum.device) if self.sum is not None else part
        self.sum = part if self.sum is None else self.sum.add_(part)

    def empty(self, device) -> torch.Tensor:
        return torch.zeros(self.rows if self.right else self.cols, self.k, dtype=self.dtype, device=device)

    def next_pass(self, total: torch.Tensor) -> None:
        """`total`: this pass's product, summed over all batches and processes, divided by their number."""
        self.last, self.product = self.basis, total
        with one_cpu_thread(total):  # LAPACK's result depends on its thread count (init_math.one_cpu_thread)
            self.basis = torch.linalg.qr(total).Q
        self.right = not self.right
        self.sum = None

    def result(self) -> "LowRankGradient":
        # after a right pass: G ~ Y P^T (P = self.last); after a left pass: G ~ Q Z^T (Q = self.last)
        with one_cpu_thread(self.product):
            Q, R = torch.linalg.qr(self.product)
            Ur, S, Vrh = torch.linalg.svd(R if not self.right else R.T)
        if not self.right:  # the last pass was right: Y = Q R, G ~ Q R P^T
            U, Vh = Q @ Ur, Vrh @ self.last.T.to(Q.device)
        else:  # Z = Q R, G ~ last R^T Q^T
            U, Vh = self.last.to(Q.device) @ Ur, Vrh @ Q.T
        return LowRankGradient(U.cpu().contiguous(), S.cpu(), Vh.cpu().contiguous(), self.shape)


def _hook(target: _Target):
    def forward_hook(module, args, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        x = args[0].detach()
        if not output.requires_grad:  # a frozen model (or the first layer): let the backward pass reach here
            output.requires_grad_()
        output.register_hook(lambda delta: target.add(x, delta.detach()))
        return None

    return forward_hook


def check_targets(modules: dict[str, nn.Module]) -> None:
    conv = [name for name, module in modules.items() if _kind(module) == "conv2d"]
    if conv:
        raise ValueError(f"estimate_gradient(low_rank=...) supports Linear, Conv1D and Embedding layers; {conv[0]!r} "
                         "is a Conv2d (exact path only): use low_rank=None or leave it out of the targets.")


def _all_reduce_sum(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = []
    for tensor in tensors:
        moved = tensor.to(device)
        dist.all_reduce(moved)
        out.append(moved.to(tensor.device))
    return out


def estimate_low_rank(runner: nn.Module, plain: nn.Module, modules: dict[str, nn.Module], dataloader: Iterable,
                      k: int, passes: int, seed: int, iters: Optional[int], device, accelerator, loss_of, to_device,
                      freeze, restore, comm_device=None) -> dict[str, LowRankGradient]:
    """The `low_rank` branch of `estimate_gradient` (see there): `passes` passes over the same (cached) batches."""
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"Invalid low_rank={k!r}: expected a positive int or None.")
    if not isinstance(passes, int) or passes < 2:
        raise ValueError(f"Invalid passes={passes!r}: the range finder needs at least 2 passes.")
    check_targets(modules)
    dtype = torch.promote_types(next(plain.parameters()).dtype, torch.float32)
    targets = [_Target(name, module, k, seed, dtype) for name, module in modules.items()]
    cache: list[Any] = []
    batches: Iterable = itertools.islice(dataloader, iters) if iters is not None else dataloader
    count = 0
    state = freeze(plain, {})  # no parameter requires grad: no weight gradient is ever computed
    handles = [t.module.register_forward_hook(_hook(t)) for t in targets]
    try:
        plain.train()
        with torch.enable_grad():
            for p in range(passes):
                for batch in (batches if p == 0 else cache):
                    if p == 0:
                        cache.append(batch)  # every pass must see the same batches (also from a generator)
                        count += 1
                    loss = loss_of(runner, to_device(batch, device))
                    accelerator.backward(loss) if accelerator is not None else loss.backward()
                if count == 0:
                    raise ValueError("The estimation dataloader yielded no batch; LoRA-GA needs at least one.")
                sums = [t.sum if t.sum is not None else t.empty(device) for t in targets]
                total = _all_reduce_sum(sums + [torch.tensor([float(count)], dtype=torch.float64)], comm_device)
                for t, s in zip(targets, total[:-1]):
                    t.next_pass(s / total[-1].item())
    finally:
        for handle in handles:
            handle.remove()
        restore(plain, state)
    return {t.name: t.result() for t in targets}
