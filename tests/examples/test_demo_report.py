"""The demo's verdicts on the papers' claims follow the numbers (synthetic loss curves, no model)."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from bbc_demo import report  # noqa: E402

STEPS = 40


def _result(method: str, curve: list[float]) -> dict:
    return {"method": method, "lr": 1e-3, "losses": curve, "accuracy": 0.9, "step_times": [1.0, 1.0],
            "train_peak_mb": 1.0, "setup_seconds": 0.0, "setup_peak_mb": 1.0, "trainable": 10}


def _claims(curves: dict[str, list[float]]) -> list[str]:
    return report.claims(report.summarise([_result(m, c) for m, c in curves.items()], STEPS), STEPS)


def _decay(rate: float, floor: float = 0.1) -> list[float]:
    return [floor + 2.0 * (1 - rate) ** k for k in range(STEPS)]


def test_loraga_verdict_follows_the_early_curve():
    (fast,) = _claims({"lora": _decay(0.05), "loraga": _decay(0.2)})
    (slow,) = _claims({"lora": _decay(0.2), "loraga": _decay(0.05)})
    # ahead at the first checkpoint only, behind afterwards: mixed, not "supported"
    crossing = [c - (0.5 if k < 6 else -0.3) for k, c in enumerate(_decay(0.1))]
    (mixed,) = _claims({"lora": _decay(0.1), "loraga": crossing})
    assert "**supported**" in fast and "**not supported**" in slow and "**mixed**" in mixed


def test_lorapro_verdict_follows_the_gap_to_full_fine_tuning():
    full, far = _decay(0.15), _decay(0.03, floor=0.5)
    lines = _claims({"full": full, "lora": far, "lorapro_full": [x + 0.01 for x in full],
                     "lorapro_efficient": [x + 0.8 for x in far]})
    assert len(lines) == 2
    assert "LoRA-Pro (full)" in lines[0] and "**supported**" in lines[0]
    assert "LoRA-Pro (efficient)" in lines[1] and "**not supported**" in lines[1]


def test_curve_gap_is_zero_for_the_same_curve_and_ignores_warm_up():
    curve = _decay(0.1)
    assert report.curve_gap(curve, curve) == 0.0
    warm_up_only = [c + (5.0 if k < 3 else 0.0) for k, c in enumerate(curve)]
    assert report.curve_gap(warm_up_only, curve) == 0.0
