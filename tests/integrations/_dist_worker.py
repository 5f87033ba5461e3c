"""transformers' Trainer on a tiny Llama, in one process or in several (gloo on CPU), for
`tests/integrations/test_distributed_trainer.py`.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/integrations/_dist_worker.py OUT CASE...

runs each CASE, `<parallel>-<method>` (e.g. `fsdp2-lora`, `zero2-lorapro-full`), and writes on rank 0
`OUT/<case>/result.json` (`{"ok", "error", "sharded"}`), `OUT/<case>/trained.pt` (the trainable tensors gathered
whole, the logits on `PROBE_IDS`, the logged losses) and the adapters the Trainer saved (`OUT/<case>/final`,
`OUT/<case>/checkpoint-<STEPS>`). The test runs `train(method, ...)` in its own process as the reference: one
process on the same global batch.

`<parallel>`:
- `ddp`: the Trainer's default under torchrun;
- `fsdp2`: `TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2})`;
- `accelerate`: no parallelism argument; the FSDP plugin comes from the environment that
  `accelerate launch --config_file examples/launch/accelerate_fsdp2.yaml` sets (launch the worker that way);
- `zero2`, `zero3`: `TrainingArguments(deepspeed=...)` with `examples/launch/deepspeed_zero{2,3}.json` (ZeRO-3 with
  `stage3_param_persistence_threshold: 0`: the tiny model's tensors are all below the default threshold, and
  would otherwise stay whole on every rank). Needs `deepspeed` installed.

On a machine without an accelerator, accelerate 1.16 does two things that `enable_cpu_distributed` undoes (the
rest of accelerate's FSDP2 / DeepSpeed path, torch's `fully_shard` on a gloo CPU mesh and DeepSpeed's CPU
accelerator then run unchanged; each result records whether the parameters really were sharded):
- it drops the FSDP plugin under `use_cpu` (its state only turns a `MULTI_GPU`-like state into `FSDP`, not
  `MULTI_CPU`), so `Trainer(fsdp=...)` on a CPU silently trains with DDP;
- without `use_cpu` (which DeepSpeed needs: `use_cpu` turns it off) it finds no backend, and then every process
  believes it is the only one (`num_processes` 1, rank 0): no data sharding, every rank logs and saves.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script by torchrun / accelerate launch: make `tests.` importable
    sys.path.insert(0, str(ROOT))

from tests.helpers.tiny_models import tiny_llama, token_ids  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS, GLOBAL_BATCH, LR = 4, 4, 1e-2
PROBE_IDS = token_ids(2, 8, seed=9)
METHODS = ("lora", "loraga", "lorapro-efficient", "lorapro-full")
CASES = tuple(f"{parallel}-{method}" for parallel in ("ddp", "fsdp2") for method in METHODS)
ACCELERATE_CASES = ("accelerate-lora",)
DEEPSPEED_CASES = ("zero2-lora", "zero3-lora", "zero2-loraga", "zero3-loraga", "zero2-lorapro-efficient",
                   "zero2-lorapro-full", "zero3-lorapro-full")
SHARDED = ("fsdp2", "accelerate", "zero3")  # where the parameters themselves are partitioned


class RandomTokens(torch.utils.data.Dataset):
    """16 sequences of 8 tokens, no padding: every example has the same number of loss tokens, so the mean of the
    per-process mean losses is the mean loss of the global batch."""

    def __init__(self, n: int = 16, length: int = 8) -> None:
        self.ids = token_ids(n, length, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def enable_cpu_distributed() -> None:
    """Let accelerate's FSDP plugin and DeepSpeed see all the processes on a CPU-only machine (module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_cpu_distributed", False):
        return
    prepare_backend, accelerator_state_init = PartialState._prepare_backend, AcceleratorState.__init__

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, distributed_type = prepare_backend(self, cpu, sagemaker_dp, backend)
        if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:  # launched, but no accelerator found
            return "gloo", DistributedType.MULTI_CPU
        return found, distributed_type

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:  # as for MULTI_GPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._cpu_distributed = True
    PartialState._prepare_backend = _prepare_backend
    AcceleratorState.__init__ = __init__


def build(method: str):
    """The PeftModel and the Trainer keyword arguments of a method (`METHODS`)."""
    from peft import LoraConfig, LoraGACallback, LoraGAConfig, LoraProConfig, get_peft_model
    from peft.optimizers import LoraProAdamW

    common = dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=TARGETS)
    if method == "lora":
        return get_peft_model(tiny_llama(), LoraConfig(**common)), {}
    if method == "loraga":
        with warnings.catch_warnings():  # "No LoraGAContext": the callback initialises at on_train_begin
            warnings.simplefilter("ignore", UserWarning)
            model = get_peft_model(tiny_llama(), LoraGAConfig(use_rslora=True, iters=2, **common))
        return model, {"callbacks": [LoraGACallback()]}
    if method.startswith("lorapro-"):
        model = get_peft_model(tiny_llama(), LoraProConfig(mode=method.split("-", 1)[1], **common))
        return model, {"optimizer_cls_and_kwargs": (LoraProAdamW, {"lr": LR})}
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def deepspeed_config(stage: int) -> dict:
    config = json.loads((ROOT / "examples" / "launch" / f"deepspeed_zero{stage}.json").read_text())
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def parallel_args(parallel: str) -> dict:
    if parallel == "fsdp2":
        return {"fsdp": True, "fsdp_config": {"fsdp_version": 2}, "use_cpu": True}
    if parallel in ("zero2", "zero3"):
        return {"deepspeed": deepspeed_config(int(parallel[-1]))}
    if parallel in ("single", "ddp", "accelerate"):
        return {"use_cpu": True}
    raise ValueError(f"unknown parallelism {parallel!r}")


def training_args(output_dir, world_size: int = 1, parallel: str = "single"):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        learning_rate=LR, lr_scheduler_type="linear", weight_decay=0.01, seed=11, data_seed=11,
        save_strategy="steps", save_steps=STEPS, logging_steps=1, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, ddp_timeout=120, **parallel_args(parallel))


def whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter gathered whole: a collective under FSDP2 and ZeRO-3 (every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return param.full_tensor().detach().cpu().clone()
    if hasattr(param, "ds_id"):  # a ZeRO-3 parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().cpu().clone()
    return param.detach().cpu().clone()


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or getattr(p, "ds_status", None) is not None for p in model.parameters())


def train(method: str, output_dir, world_size: int = 1, parallel: str = "single") -> dict:
    """Train one method (one process, or this rank of `world_size`): the trainable tensors (whole), the logits on
    `PROBE_IDS`, the logged losses, and whether the parameters were partitioned (DTensors, ZeRO-3)."""
    from transformers import Trainer

    model, trainer_kwargs = build(method)
    trainer = Trainer(model=model, args=training_args(output_dir, world_size, parallel), train_dataset=RandomTokens(),
                      **trainer_kwargs)
    trainer.train()
    trainer.save_model(str(Path(output_dir) / "final"))
    engine = trainer.model_wrapped  # the FSDP2 / DeepSpeed / DDP-wrapped model
    model = getattr(engine, "module", engine)
    trainable = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
    sharded = is_sharded(model)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=PROBE_IDS).logits.detach().cpu().clone()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"trainable": trainable, "logits": logits, "losses": losses, "sharded": sharded}


def main(out: str, cases: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    enable_cpu_distributed()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    launched_env = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")}
    for case in cases:
        for key, value in launched_env.items():  # accelerate sets ACCELERATE_USE_FSDP for the rest of the process
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        case_dir = Path(out) / case
        result = {"ok": False, "error": None, "sharded": None}
        try:
            parallel, method = case.split("-", 1)
            trained = train(method, case_dir, world_size=world, parallel=parallel)
            result.update(ok=True, sharded=trained.pop("sharded"))
            if rank == 0:
                torch.save(trained, case_dir / "trained.pt")
        except Exception as error:  # recorded for the test, which reports it
            result["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        results = [None] * world  # a case that failed on one rank only leaves the group out of step: this times out
        dist.all_gather_object(results, result)
        if rank == 0:
            errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if not res["ok"]]
            combined = {"ok": not errors, "error": "; ".join(errors) or None, "sharded": result["sharded"]}
            case_dir.mkdir(parents=True, exist_ok=True)
            (case_dir / "result.json").write_text(json.dumps(combined))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
