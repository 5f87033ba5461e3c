"""Small fixtures shared by the LoRA-GA tests: a tiny Llama, its batches, and a model with every layer type."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers.tiny_models import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    return tiny_llama(dtype=dtype, seed=seed)


def token_batches(n: int = 2, bsz: int = 2, seq: int = 8, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (bsz, seq), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class Mixed(nn.Module):
    """Embedding -> Conv1D -> Conv2d -> Linear, with a scalar loss when `labels` is given."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(20, 12)
        self.proj = Conv1D(16, 12)  # stored (in=12, out=16)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6 * 4, 5)

    def forward(self, input_ids, labels=None):
        h = self.proj(self.emb(input_ids))  # (b, t, 16)
        h = self.conv(h.reshape(-1, 4, 2, 2).transpose(1, 1))  # (b*t, 6, 2, 2)
        logits = self.head(h.flatten(1)).reshape(*input_ids.shape, 5)
        if labels is None:
            return {"logits": logits}
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten() % 5)
        return {"loss": loss, "logits": logits}


def mixed_batches(n: int = 2, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 20, (3, 4), generator=gen)), "labels": ids.clone()}
            for _ in range(n)]


def assert_same_adapter_files(folder_a, folder_b) -> None:
    """The two folders hold the same adapter: equal `adapter_config.json` (as JSON), and equal tensors (dtype,
    shape, values) and metadata in `adapter_model.safetensors`. Not the bytes: safetensors writes the metadata
    entries in a hash map's order, which varies between saves once there are two of them."""
    import json
    import os

    from safetensors import safe_open

    def read(folder):
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
            return config, f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    (config_a, meta_a, tensors_a), (config_b, meta_b, tensors_b) = read(folder_a), read(folder_b)
    assert config_a == config_b
    assert meta_a == meta_b
    assert sorted(tensors_a) == sorted(tensors_b)
    for key, value in tensors_a.items():
        assert value.dtype == tensors_b[key].dtype and torch.equal(value, tensors_b[key]), key
