"""transformers' Trainer with 2 processes (gloo, CPU) for LoRA, LoRA-GA (`LoraGACallback`) and LoRA-Pro
(`optimizer_cls_and_kwargs=(LoraProAdamW, ...)`, both modes): DDP and FSDP2 under torchrun, FSDP2 from
`accelerate launch --config_file examples/launch/accelerate_fsdp2.yaml`, and (marked slow, only where `deepspeed` is
installed: `pip install -e ".[deepspeed]"`) DeepSpeed ZeRO-2 / ZeRO-3 with `examples/launch/deepspeed_zero*.json`.

Each launch runs all its cases of `tests/integrations/_dist_worker.py` (starting the processes is the slow part);
each case then must
- end with the trainable weights of one process trained on the same global batch (fp32: equal up to rounding,
  1e-8 for LoRA; LoRA-GA's SVD of a gradient summed in another order amplifies that to 2e-6),
- save adapters (`checkpoint-N` and `trainer.save_model`) that reload in one process with the trained model's logits.

What does not work yet is marked `xfail(strict=True)` with the failure seen, so that the mark has to go when it
starts to work. See docs/multi_gpu.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from peft import PeftModel
from tests.helpers.tiny_models import tiny_llama
from tests.integrations import _dist_worker as worker

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "examples" / "launch"
WORKER = str(Path(worker.__file__))
LAUNCH_TIMEOUT_S = 300
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(LAUNCH / "accelerate_fsdp2.yaml"), "--num_processes", "2",
              "--mixed_precision", "no", "--main_process_port", "0"]

pytestmark = pytest.mark.skipif(os.name == "nt" or not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo (POSIX)")


class DistributedRunFailed(Exception):
    """The case raised under the launcher (the worker's message, per rank)."""


# --- what does not work, and how it fails (seen with torch 2.13, transformers 5.25, accelerate 1.16, deepspeed 0.19.8)
ZERO_LORAPRO = ("LoraProAdamW under ZeRO: DeepSpeed hands the client optimizer one flat fp32 partition per param group "
                "and keeps the gradients in its own buffers, so no pair of A and B ever has a .grad and the partition "
                "would be stepped as plain AdamW (the weights equal plain LoRA's): LoraProAdamW.step refuses it")
ZERO2_LORAGA = ("LoraGACallback under ZeRO-2: it writes A, B into the model after DeepSpeed copied them to its fp32 "
                "master partition; the first step copies the master (LoRA's init + one step) back over them, while the "
                "base weights stay offset by -s B0 A0: LoraGACallback refuses DeepSpeed")
ZERO3_LORAGA = ("LoraGACallback under ZeRO-3: the parameters are partitioned (empty on each rank) when the callback "
                "initialises (peft/tuners/loraga/model.py compute_factors: RuntimeError: shape '[0]' is invalid for "
                "input of size 32)")
EQUALITY_XFAIL = {"zero2-loraga": (ZERO2_LORAGA, DistributedRunFailed),
                  "zero3-loraga": (ZERO3_LORAGA, DistributedRunFailed),
                  "zero2-lorapro-efficient": (ZERO_LORAPRO, DistributedRunFailed),
                  "zero2-lorapro-full": (ZERO_LORAPRO, DistributedRunFailed),
                  "zero3-lorapro-full": (ZERO_LORAPRO, DistributedRunFailed)}
RELOAD_XFAIL = {case: known for case, known in EQUALITY_XFAIL.items() if known[1] is DistributedRunFailed}


def _params(known: dict) -> list:
    params = []
    for case in worker.CASES + worker.ACCELERATE_CASES + worker.DEEPSPEED_CASES:
        marks = [pytest.mark.slow] if case in worker.DEEPSPEED_CASES else []
        if case in known:
            reason, raises = known[case]
            marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
        params.append(pytest.param(case, marks=marks, id=case))
    return params


# --- launching --------------------------------------------------------------------------------------------------------
def _launch(out: Path, launcher: list[str], cases: list[str], env: dict) -> None:
    proc = subprocess.Popen([*launcher, WORKER, str(out), *cases], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the workers it started: their own session
        log, _ = proc.communicate()
    (out / f"launch-{len(list(out.glob('launch-*.log')))}.log").write_text(log)


def _run_all(out: Path, launcher: list[str], cases: tuple[str, ...], env: dict | None = None) -> Path:
    _launch(out, launcher, list(cases), env or {})
    for case in cases:  # a case that crashed or hung the process group: once more on its own
        if not (out / case / "result.json").exists():
            _launch(out, launcher, [case], env or {})
    return out


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory) -> Path:
    return _run_all(tmp_path_factory.mktemp("torchrun"), TORCHRUN, worker.CASES)


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory) -> Path:
    return _run_all(tmp_path_factory.mktemp("accelerate"), ACCELERATE, worker.ACCELERATE_CASES)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory) -> Path:
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install -e '.[deepspeed]'")
    return _run_all(tmp_path_factory.mktemp("deepspeed"), TORCHRUN, worker.DEEPSPEED_CASES, {"DS_ACCELERATOR": "cpu"})


def _distributed(request, case: str) -> tuple[Path, dict]:
    """(folder of the case, what the worker saved), or DistributedRunFailed with the error the case raised."""
    fixture = {"accelerate": "accelerate_runs", "zero2": "deepspeed_runs", "zero3": "deepspeed_runs"}
    parallel = case.split("-", 1)[0]
    runs = request.getfixturevalue(fixture.get(parallel, "torchrun_runs"))
    result_file = runs / case / "result.json"
    if not result_file.exists():
        logs = "\n".join(p.read_text()[-3000:] for p in sorted(runs.glob("launch-*.log")))
        pytest.fail(f"{case}: the launch wrote no result; its output ends with:\n{logs}")
    result = json.loads(result_file.read_text())
    if not result["ok"]:
        raise DistributedRunFailed(f"{case}: {result['error']}")
    assert result["sharded"] == (parallel in worker.SHARDED), f"{case}: parameters sharded = {result['sharded']}"
    return runs / case, torch.load(runs / case / "trained.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """method -> the one-process run on the global batch (trained once per method)."""
    runs = {}

    def run(method: str) -> dict:
        if method not in runs:
            runs[method] = worker.train(method, tmp_path_factory.mktemp(f"one_process_{method}"))
        return runs[method]

    return run


# --- the checks -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _params(EQUALITY_XFAIL))
def test_two_processes_equal_one_process_on_the_global_batch(request, case, one_process):
    _, trained = _distributed(request, case)
    single = one_process(case.split("-", 1)[1])
    assert trained["trainable"].keys() == single["trainable"].keys()
    assert any("lora_B" in name for name in single["trainable"])
    for name, value in single["trainable"].items():
        torch.testing.assert_close(trained["trainable"][name], value, rtol=1e-4, atol=1e-5, msg=f"{case}: {name}")
    torch.testing.assert_close(trained["logits"], single["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(trained["losses"]), torch.tensor(single["losses"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", _params(RELOAD_XFAIL))
@pytest.mark.parametrize("folder", ["final", f"checkpoint-{worker.STEPS}"])
def test_saved_adapter_reloads_in_one_process(request, case, folder):
    case_dir, trained = _distributed(request, case)
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(case_dir / folder)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=worker.PROBE_IDS).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0, atol=1e-5)


# --- the launch example (examples/launch): its --smoke path in this process, its refusals, its shell scripts ---------
def _launch_example():
    spec = importlib.util.spec_from_file_location("launch_train", LAUNCH / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["lora", "loraga", "lorapro"])
def test_launch_example_smoke(method, tmp_path):
    example = _launch_example()
    result = example.main(["--smoke", "--method", method, "--output-dir", str(tmp_path)])
    assert len(result["losses"]) == 4 and all(math.isfinite(loss) for loss in result["losses"])
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_launch_example_refuses_what_trains_wrong():
    example = _launch_example()
    for method in ("loraga", "lorapro"):
        with pytest.raises(SystemExit, match="trains wrong without an error"):
            example.main(["--smoke", "--method", method, "--deepspeed", str(LAUNCH / "deepspeed_zero2.json")])


def test_launch_scripts_parse():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert {p.name for p in scripts} >= {"torchrun_ddp.sh", "torchrun_fsdp2.sh", "accelerate_fsdp2.sh",
                                         "deepspeed_zero2.sh", "deepspeed_zero3.sh"}
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_docs_show_the_launch_configs_in_full():
    """docs/multi_gpu.md shows accelerate_fsdp2.yaml (without its two header comment lines) and deepspeed_zero2.json
    as they are."""
    docs = (ROOT / "docs" / "multi_gpu.md").read_text()
    yaml_file = (LAUNCH / "accelerate_fsdp2.yaml").read_text()
    yaml_body = "".join(line for line in yaml_file.splitlines(keepends=True) if not line.startswith("#"))
    assert f"```yaml\n{yaml_body}```" in docs
    assert f"```json\n{(LAUNCH / 'deepspeed_zero2.json').read_text()}```" in docs
