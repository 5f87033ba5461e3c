"""DyLoRA's math as pure functions (Valipour et al., EACL 2023, arXiv 2210.07558).

LoRA factors `A` (r x n) and `B` (m x r) trained so that every truncation works: a step samples `b` in
`[r_min, r]` (the paper's uniform p_B) and computes

    h = W0 x + (alpha / b) * B[:, :b] @ A[:b] @ x            (the paper's eq. for W_up|b, W_dw|b)

In the paper's Algorithm 1 only the b-th row of A and the b-th column of B receive a gradient in that step (the
rows / columns below b are reused, frozen); "all" mode trains every row / column up to b (nested dropout).
"""

from __future__ import annotations

from typing import Optional

import torch

UPDATE_MODES: tuple[str, ...] = ("frozen", "all")


def dylora_scale(alpha: float, b: int, r: int, fixed: bool = False) -> float:
    """The scale of a rank-b truncation: `alpha / b` (the paper), or `alpha / r` at every b with `fixed`.

    With `alpha / b` the i-th component is weighted differently at each rank, so no factors make every truncation
    optimal at once (a compromise is learned); with `alpha / r` nested optimal factors exist (an SVD's leading
    components)."""
    return alpha / (r if fixed else b)


def trained_rows(b: int, r_min: int, mode: str) -> tuple[int, int]:
    """Half-open range of the rows of A (columns of B) that get a gradient at sampled rank `b`.

    "all": `[0, b)`. "frozen" (the paper's default): `[b-1, b)`, except at `b == r_min`, where the first `r_min`
    rows train together (else rows below r_min would never train when r_min > 1).
    """
    if mode == "all" or b == r_min:
        return 0, b
    return b - 1, b


def truncated_factors(A: torch.Tensor, B: torch.Tensor, b: int, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`A[:b]` (b x n) and `B[:, :b]` (m x b); rows / columns below `lo` are detached (no gradient)."""
    A_b, B_b = A[:b], B[:, :b]
    if lo > 0:
        A_b = torch.cat([A_b[:lo].detach(), A_b[lo:]], dim=0)
        B_b = torch.cat([B_b[:, :lo].detach(), B_b[:, lo:]], dim=1)
    return A_b, B_b


def truncated_delta(A: torch.Tensor, B: torch.Tensor, b: int, scale: float) -> torch.Tensor:
    """`scale * B[:, :b] @ A[:b]`: the m x n update at rank b (`scale` from `dylora_scale`)."""
    return (B[:, :b] @ A[:b]) * scale


def truncated_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, b: int, scale: float, lo: int = 0):
    """`scale * x @ A[:b]^T @ B[:, :b]^T` for `x` of shape `(..., n)`, without the m x n matrix."""
    A_b, B_b = truncated_factors(A, B, b, lo)
    return (x @ A_b.transpose(0, 1)) @ B_b.transpose(0, 1) * scale


class RankSampler:
    """One sampled rank per training step, shared by every layer of one adapter.

    Through `PeftModel`, the tuner calls `start_step()` at the start of every training forward (its
    `forward_context`): one `b ~ U{r_min..r}` holds for every layer until the next forward, so a module called twice
    and gradient checkpointing's recompute see the same b. Without a `PeftModel` (`inject_adapter_in_model`), a
    layer's `rank_for(key)` draws: the first ask of a step draws b, the other layers get the same b, and a layer
    asking twice means the next step has begun (then a module called twice in one forward starts a new draw).
    `fixed` pins the training rank (e.g. to measure one rank).
    """

    def __init__(self, r_min: int, r_max: int, seed: Optional[int] = None) -> None:
        if not 1 <= r_min <= r_max:
            raise ValueError(f"Invalid r_min={r_min}: expected 1 <= r_min <= r={r_max}.")
        self.r_min, self.r_max = r_min, r_max
        self.generator = torch.Generator(device="cpu")  # explicit cpu: may be built inside a meta-device context
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,), device="cpu").item()) if seed is None else seed)
        self.current: Optional[int] = None
        self.fixed: Optional[int] = None
        self._seen: set = set()
        self._stepped = False  # True once the tuner's forward context drives the steps

    def start_step(self) -> None:
        """A new training step: draw b for every layer until the next call."""
        self.current, self._seen, self._stepped = self.draw(), set(), True

    def draw(self) -> int:
        b = torch.randint(self.r_min, self.r_max + 1, (1,), generator=self.generator, device="cpu").item()
        return int(b)

    def rank_for(self, key) -> int:
        if self.fixed is not None:
            return self.fixed
        if self._stepped and self.current is not None:
            return self.current
        if self.current is None or key in self._seen:
            self.current, self._seen = self.draw(), set()
        self._seen.add(key)
        return self.current
