"""What a LoRA-GA init folder belongs to, and the check the final saves run before trusting its A0, B0.

The final adapter is `([A; A0], [B, -B0])`: with the A0, B0 of another adapter or another run it loads without an
error and gives wrong outputs. So `save_loraga_model_init` writes, beside the plain rank-r adapter, a small JSON:

    loraga_init.json: {"adapter_name": "default",
                       "tensors": {"<on-disk key of A0 or B0>": {"shape": [r, n], "dtype": "float32",
                                                                 "sha256": "<fingerprint>"}}}

and the tuner keeps the same fingerprints for every adapter it initialised (`model.init_fingerprints`).
`check_initial_factors` compares an init folder's A0, B0 with its JSON, with the adapter being saved (same factor keys
and shapes) and with the tuner's fingerprints; any difference is a ValueError naming it. A fingerprint is the
SHA-256 of the dtype, the shape and the bytes: equal fingerprints mean bit-for-bit equal factors.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from ...utils.io import atomic_write_text

RECORD_FILE = "loraga_init.json"
FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def fingerprint(tensor: torch.Tensor) -> str:
    """SHA-256 of `tensor`'s dtype, shape and bytes (CPU, contiguous)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{data.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def factor_items(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA factors (A, B; embedding A, B) of an on-disk state dict; no modules_to_save, no biases."""
    return {k: v for k, v in state.items() if k.endswith(FACTOR_SUFFIXES)}


def describe(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """On-disk key -> {"shape", "dtype", "sha256"} for every factor in `state`."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": fingerprint(v)}
            for k, v in sorted(factor_items(state).items())}


def write_record(folder: str, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Write `folder/loraga_init.json`: the adapter `state`'s factors belong to, and their fingerprints."""
    record = {"adapter_name": adapter_name, "tensors": describe(state)}
    atomic_write_text(os.path.join(folder, RECORD_FILE), json.dumps(record, indent=2, sort_keys=True))


def read_record(folder: str) -> Optional[dict]:
    """The folder's `loraga_init.json`, or None (folders written before it existed, or by `save_pretrained`)."""
    path = os.path.join(folder, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if not (isinstance(record, dict) and isinstance(record.get("tensors"), dict)):
        raise ValueError(f"{path!r} is not a LoRA-GA init record (expected an object with 'adapter_name' and "
                         "'tensors').")
    return record


def _keys(keys) -> str:
    keys = sorted(keys)
    return str(keys) if len(keys) <= 3 else f"{keys[:3]} ... ({len(keys)} in all)"


def check_initial_factors(init_state: dict[str, torch.Tensor], *, adapter_name: str, source: str,
                          expected_shapes: dict[str, tuple], recorded: Optional[dict[str, str]] = None,
                          record: Optional[dict] = None) -> None:
    """Refuse initial factors `init_state` (on-disk key -> A0 or B0, read from `source`) that do not belong to the
    adapter `adapter_name` being saved, whose factors have `expected_shapes` (on-disk key -> shape). `record`: the
    folder's `loraga_init.json` (adapter name, fingerprints); `recorded`: the fingerprints the tuner took when it
    offset the base (on-disk key -> fingerprint). Each is checked when given; the first mismatch raises."""
    init = factor_items(init_state)
    if record is not None:
        owner = record.get("adapter_name")
        if owner != adapter_name:
            raise ValueError(f"{source} holds the initial factors of adapter {owner!r}, but adapter {adapter_name!r} "
                             f"is being saved. Save each adapter's init into its own folder (save_loraga_model_init("
                             f"model, save_dir, adapter_name={adapter_name!r}) with a save_dir of its own).")
        described = describe(init)
        changed = [k for k in set(described) | set(record["tensors"]) if described.get(k) != record["tensors"].get(k)]
        if changed:
            raise ValueError(f"{source}: the factors {_keys(changed)} are not the ones its {RECORD_FILE} describes; "
                             "the weights were replaced after save_loraga_model_init wrote the folder.")
    missing, extra = set(expected_shapes) - set(init), set(init) - set(expected_shapes)
    shapes = {k: (tuple(init[k].shape), tuple(v)) for k, v in expected_shapes.items()
              if k in init and tuple(init[k].shape) != tuple(v)}
    if missing or extra or shapes:
        parts = ([f"missing {_keys(missing)}"] if missing else []) + \
                ([f"not in the adapter: {_keys(extra)}"] if extra else []) + \
                [f"{k!r} is {there} there, {here} in the adapter" for k, (there, here) in sorted(shapes.items())[:3]]
        raise ValueError(f"{source} does not hold the initial factors of adapter {adapter_name!r} (other targets, "
                         f"rank or model?): {'; '.join(parts)}.")
    if recorded is not None:
        differ = sorted(k for k in init if fingerprint(init[k]) != recorded.get(k))
        if differ:
            raise ValueError(
                f"{source} holds initial factors that differ from the ones adapter {adapter_name!r} was initialised "
                f"with in this model: {_keys(differ)}. It was written by another run (or another model); the final "
                "adapter needs the very A0, B0 the base weights were offset with. Save them again with "
                "save_loraga_model_init from this model's run, or remove the folder to use the model's own record.")
