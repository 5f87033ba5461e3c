"""Per-seed verdicts on the papers' claims, for runs with several seeds (the MLM task's report).

Every comparison pairs runs of the same seed (same head init, same batches, same masks), then summarises over seeds:

- the gap: `L_lora - L_full` (final training loss, and held-out loss); the task can only separate the methods if it
  is positive in every seed;
- LoRA-GA "converges faster than LoRA": the first step at which LoRA-GA's smoothed training loss reaches LoRA's
  final one, against the step at which LoRA itself first reaches it;
- LoRA-Pro "closes the gap to full fine-tuning": the fraction `(L_lora - L_method) / (L_lora - L_full)` of LoRA's
  gap closed (1: as good as full fine-tuning, 0: as LoRA, < 0: worse than LoRA), training and held-out.
"""

from __future__ import annotations

import statistics

from .methods import LABELS
from .report import loss_at

SMOOTH = 5


def steps_to_reach(losses: list[float], target: float) -> int | None:
    """First step k (SMOOTH..len) whose smoothed training loss (mean of steps k-SMOOTH+1..k) is <= target."""
    for k in range(min(SMOOTH, len(losses)), len(losses) + 1):
        if loss_at(losses, k) <= target:
            return k
    return None


def gap_fraction(lora: float, method: float, full: float) -> float:
    """Fraction of LoRA's gap to full fine-tuning that `method` closes."""
    if lora - full <= 0:
        raise ValueError(f"Invalid gap: lora={lora} full={full}; expected LoRA's loss above full fine-tuning's.")
    return (lora - method) / (lora - full)


def verdict(wins: int, total: int) -> str:
    return "supported" if wins == total else ("not supported" if wins == 0 else "mixed")


def _ms(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _by_seed(results: list[dict], method: str) -> dict[int, dict]:
    return {r["seed"]: r for r in results if r["method"] == method}


def _final(run: dict) -> float:
    return loss_at(run["losses"], len(run["losses"]))


def seed_claims(results: list[dict]) -> list[str]:
    """Markdown bullet lines: the gap, then LoRA-GA's and LoRA-Pro's verdicts (for the methods that ran)."""
    full, lora = _by_seed(results, "full"), _by_seed(results, "lora")
    seeds = sorted(set(full) & set(lora))
    if not seeds:
        return []
    gap_train = [_final(lora[s]) - _final(full[s]) for s in seeds]
    gap_eval = [lora[s]["eval_loss"] - full[s]["eval_loss"] for s in seeds]
    has_gap = all(g > 0 for g in gap_train + gap_eval)
    out = [f"- LoRA lags full fine-tuning on this task: **{'yes' if has_gap else 'no'}** (LoRA minus full, over "
           f"seeds {seeds}: final train loss {_ms(gap_train)}, held-out loss {_ms(gap_eval)}; positive in "
           f"{sum(g > 0 for g in gap_train)}/{len(seeds)} and {sum(g > 0 for g in gap_eval)}/{len(seeds)} seeds)."]
    ga = _by_seed(results, "loraga")
    ga_seeds = [s for s in seeds if s in ga]
    if ga_seeds:
        reach = [(steps_to_reach(ga[s]["losses"], _final(lora[s])), steps_to_reach(lora[s]["losses"], _final(lora[s])))
                 for s in ga_seeds]
        wins = sum(g is not None and g < lo for g, lo in reach)
        shown = ", ".join(f"{'never' if g is None else g} vs {lo}" for g, lo in reach)
        out.append(f"- LoRA-GA converges faster than LoRA: **{verdict(wins, len(reach))}** here (steps to reach "
                   f"LoRA's final training loss, LoRA-GA vs LoRA, per seed: {shown}; held-out loss LoRA-GA "
                   f"{_ms([ga[s]['eval_loss'] for s in ga_seeds])} vs LoRA "
                   f"{_ms([lora[s]['eval_loss'] for s in ga_seeds])}).")
    for key in ("lorapro_full", "lorapro_efficient"):
        pro = _by_seed(results, key)
        pro_seeds = [s for s in seeds if s in pro]
        if not pro_seeds:
            continue
        if not has_gap:
            out.append(f"- {LABELS[key]} closes the gap to full fine-tuning: **not measurable** here (LoRA does not "
                       "lag full fine-tuning in every seed).")
            continue
        train = [gap_fraction(_final(lora[s]), _final(pro[s]), _final(full[s])) for s in pro_seeds]
        held = [gap_fraction(lora[s]["eval_loss"], pro[s]["eval_loss"], full[s]["eval_loss"]) for s in pro_seeds]
        wins = sum(f > 0 for f in train + held)
        out.append(f"- {LABELS[key]} closes the gap to full fine-tuning: **{verdict(wins, len(train) + len(held))}** "
                   f"here (fraction of LoRA's gap closed, (L_lora - L) / (L_lora - L_full), over seeds "
                   f"{pro_seeds}: training {_ms(train, 2)}, held-out {_ms(held, 2)}; per seed training "
                   f"{', '.join(f'{f:.2f}' for f in train)}, held-out {', '.join(f'{f:.2f}' for f in held)}).")
    return out
