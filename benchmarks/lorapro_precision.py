"""fp32 against fp64 agreement of a LoRA-Pro step right after B has left zero (docs/lorapro.md, "Precision").

The case: W (m, n) with LoRA rank r, s = 2, A Kaiming-uniform, B = 0, and a full gradient g whose singular values
fall as k^-decay (the larger the decay, the closer g is to low rank, as the gradients of one batch are). Step 1
(full mode, lr 1e-3, computed in fp64) moves B off zero to entries of about 1e-3; B is then nearly rank-deficient
(its columns follow g's few strong directions), so `B^T B` is ill-conditioned. Step 2, on a gradient g2 near g, is
computed twice from the same fp32 inputs (A, B, the LoRA gradients, the moments): in fp32 (what training does) and
in fp64 (the reference). Printed: the relative error `|d32 - d64| / |d64|` of the step's update of (A, B) and of
the W-update `s (B dA + dB A)`, median and max over seeds, per decay, for modes "full" and "efficient".

    python benchmarks/lorapro_precision.py              # m = n = 512, r = 8 and 16, 3 seeds (about a minute)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

from peft.tuners.lorapro import math as lp

F64 = torch.float64


def make_case(m: int, n: int, r: int, decay: float, seed: int) -> tuple:
    """(A, g1, g2): A (r, n) Kaiming-uniform, g1 (m, n) with singular values k^-decay, g2 = g1 + a rank-4 change."""
    gen = torch.Generator().manual_seed(seed)
    A = (torch.rand(r, n, generator=gen, dtype=F64) * 2 - 1) / math.sqrt(n)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))
    g1 = (U * torch.arange(1, k + 1, dtype=F64) ** -decay) @ V.T
    g2 = g1 + 0.1 * U[:, :4] @ torch.randn(4, n, generator=gen, dtype=F64) / math.sqrt(n)
    return A, g1, g2


def step(mode: str, A, B, g, s: float, moments, t: int, dtype: torch.dtype):
    """One LoRA-Pro step in `dtype` from inputs (fp64 tensors holding fp32 values): new (A, B), moments, in fp64."""
    gA, gB = (x.float().to(dtype) for x in lp.lora_gradients(A, B, g, s))  # fp32 gradients, as autograd gives
    A, B = A.to(dtype), B.to(dtype)
    moments = [x.to(dtype).clone() for x in moments]
    hp = lp.AdamHyper(1e-3)
    if mode == "full":
        new_A, new_B = lp.full_mode_step(A, B, gA, gB, s, *moments, t, hp, "sylvester", 1e-8)
    else:
        new_A, new_B = lp.efficient_mode_step(A, B, gA, gB, s, tuple(moments), t, hp, "sylvester", 1e-8)
    return new_A.to(F64), new_B.to(F64), [x.to(F64) for x in moments]


def errors(mode: str, m: int, n: int, r: int, decay: float, seed: int, s: float = 2.0) -> tuple[float, float]:
    """(relative error of the (A, B) update, of the W-update) of step 2, fp32 against fp64."""
    A, g1, g2 = make_case(m, n, r, decay, seed)
    B = torch.zeros(m, r, dtype=F64)
    shapes = [(m, n)] * 2 if mode == "full" else [(r, n), (r, n), (m, r), (m, r)]
    moments = [torch.zeros(shape, dtype=F64) for shape in shapes]
    A1, B1, moments = step(mode, A, B, g1, s, moments, 1, F64)
    A1, B1 = A1.float().double(), B1.float().double()  # as stored in fp32
    moments = [x.float().double() for x in moments]
    (a32, b32, _), (a64, b64, _) = (step(mode, A1, B1, g2, s, moments, 2, dt) for dt in (torch.float32, F64))
    dA32, dB32, dA64, dB64 = a32 - A1, b32 - B1, a64 - A1, b64 - B1
    both = torch.cat([dA64.flatten(), dB64.flatten()])
    err = (torch.cat([dA32.flatten(), dB32.flatten()]) - both).norm() / both.norm()
    dW32, dW64 = s * (B1 @ dA32 + dB32 @ A1), s * (B1 @ dA64 + dB64 @ A1)
    return err.item(), ((dW32 - dW64).norm() / dW64.norm()).item()


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--decays", default="1.5,4,6,8")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    lines = ["| mode | r | decay | update rel. err. (median / max) | W-update rel. err. (median / max) |",
             "|---|---|---|---|---|"]
    for mode in ("full", "efficient"):
        for r in (int(x) for x in args.ranks.split(",")):
            for decay in (float(x) for x in args.decays.split(",")):
                errs = [errors(mode, args.size, args.size, r, decay, seed) for seed in range(args.seeds)]
                upd, dw = [e[0] for e in errs], [e[1] for e in errs]
                lines.append(f"| {mode} | {r} | {decay:g} | {statistics.median(upd):.1e} / {max(upd):.1e} | "
                             f"{statistics.median(dw):.1e} / {max(dw):.1e} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(main() and 0)
