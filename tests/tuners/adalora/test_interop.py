"""AdaLoRA adapters move both ways between this package and upstream PEFT 0.21.2 with equal outputs (Linear,
Conv1D, Conv2d), including adapters saved after rank allocation (with a rank pattern). One upstream subprocess
does all upstream work (see interop_script.py)."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.tuners.adalora import interop_script as side
from tests.upstream_harness import UpstreamUnavailable, ensure_upstream_peft, run_upstream

pytestmark = pytest.mark.upstream

SCRIPT = Path(side.__file__)
TOL = 1e-10  # float64 throughout
BASE = dict(init_r=4, target_r=2, lora_alpha=6)
CONFIGS = {
    "seq": dict(target_modules=["0", "2"], total_step=10),  # Conv2d + Linear
    # with a task type: upstream adds the orthogonality penalty only in its task models' forward
    "bert": dict(target_modules=["query", "value", "dense"], total_step=10, task_type="SEQ_CLS"),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], total_step=10, task_type="CAUSAL_LM"),  # Conv1D
}
# trained 6 steps with allocation: the budget shrinks over steps 2..4, the final mask is fixed at step 4
ALLOCATED = dict(total_step=6, tinit=1, tfinal=2, deltaT=1)
CASES = [("seq", False), ("bert", False), ("gpt2", False), ("bert", True), ("gpt2", True)]
IDS = [f"{kind}-{'allocated' if trained else 'random'}" for kind, trained in CASES]


@dataclass
class Case:
    kind: str
    trained: bool
    ours: Path  # saved by this package, loaded by upstream
    theirs: Path  # saved and reloaded by upstream

    def config(self) -> dict:
        return {**BASE, **CONFIGS[self.kind], **(ALLOCATED if self.trained else {})}


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    try:
        ensure_upstream_peft()
    except UpstreamUnavailable as exc:  # pragma: no cover - machines without a package index
        pytest.skip(f"upstream peft unavailable: {exc}")
    root = tmp_path_factory.mktemp("adalora_interop")
    out, jobs = {}, []
    for (kind, trained), name in zip(CASES, IDS):
        case = Case(kind, trained, root / "ours" / name, root / "theirs" / name)
        side.save(str(case.ours), kind, case.config(), 6 if trained else 0)
        jobs.append({"op": "load", "dir": str(case.ours), "kind": kind})
        jobs.append({"op": "save", "dir": str(case.theirs), "kind": kind, "config": case.config(),
                     "steps": 6 if trained else 0})
        jobs.append({"op": "load", "dir": str(case.theirs), "kind": kind})
        out[name] = case
    (root / "manifest.json").write_text(json.dumps(jobs))
    run_upstream(SCRIPT, [str(root / "manifest.json")], timeout=600)
    return out


def _ours_load(folder: Path, kind: str):
    from peft import PeftModel

    model = PeftModel.from_pretrained(side.build(kind), folder)
    with torch.no_grad():
        out = side.output(kind, model(**side.inputs(kind)))
    loss = None
    if kind != "seq":
        trainable = PeftModel.from_pretrained(side.build(kind), folder, is_trainable=True).eval()
        with torch.no_grad():
            loss = trainable(**side.inputs(kind, labels=True)).loss
    return out, loss


def _load(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)


def _check_changes_output(case: Case, live: torch.Tensor) -> None:
    with torch.no_grad():
        base = side.output(case.kind, side.build(case.kind)(**side.inputs(case.kind)))
    assert (live - base).abs().max() > 1e-4, "the adapter must change the output, or no test"


def _check_rank_pattern(folder: Path) -> None:
    pattern = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and all(k.endswith(".lora_E") for k in pattern)
    assert sum(sum(mask) for mask in pattern.values()) == BASE["target_r"] * len(pattern)


@pytest.mark.parametrize("name", IDS)
def test_ours_saved_upstream_loads(cases, name):
    case = cases[name]
    assert json.loads((case.ours / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    if case.trained:
        _check_rank_pattern(case.ours)
    live = _load(case.ours / "live.pt")
    _check_changes_output(case, live)
    assert (_load(case.ours / "loaded.pt") - live).abs().max().item() < TOL
    if case.kind != "seq":  # the same loss, orthogonality penalty included, from the reloaded adapter
        ours_out, ours_loss = _ours_load(case.ours, case.kind)
        assert (ours_out - live).abs().max().item() < TOL
        assert abs(ours_loss.item() - _load(case.ours / "loaded_loss.pt").item()) < 1e-9


@pytest.mark.parametrize("name", IDS)
def test_upstream_saved_ours_loads(cases, name):
    case = cases[name]
    if case.trained:
        _check_rank_pattern(case.theirs)
    live = _load(case.theirs / "live.pt")
    _check_changes_output(case, live)
    ours, ours_loss = _ours_load(case.theirs, case.kind)
    assert (ours - _load(case.theirs / "loaded.pt")).abs().max().item() < TOL  # same file, same model
    # upstream 0.21.2 trains `ranknum` (it drifts from init_r, e.g. 4 -> 3.96) but does not save it, so its own
    # reload of a trained adapter differs slightly from its live model; untrained, they are equal
    assert (ours - live).abs().max().item() < (1e-3 if case.trained else TOL)
    if case.kind != "seq":
        assert abs(ours_loss.item() - _load(case.theirs / "loaded_loss.pt").item()) < 1e-9
