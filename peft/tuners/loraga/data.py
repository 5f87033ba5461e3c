"""The estimation data of LoRA-GA: `iters` batches of `bsz` examples cut to `max_length` tokens (LoraGAConfig)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Subset


def _cut(value: Any, max_length: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim >= 1:
        return value[..., :max_length]
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (int, float)):
        return torch.tensor(value[:max_length])
    return value


def pad_collate(pad_token_id: int = 0, label_pad: int = -100) -> Callable[[list[dict]], dict]:
    """Collate dicts of token sequences by right-padding to the longest one (labels with `label_pad`)."""

    def collate(rows: list[dict]) -> dict:
        out = {}
        for key in rows[0]:
            values = [torch.as_tensor(r[key]) for r in rows]
            if values[0].ndim == 0:
                out[key] = torch.stack(values)
                continue
            width = max(v.shape[-1] for v in values)
            fill = label_pad if key == "labels" else (0 if key == "attention_mask" else pad_token_id)
            out[key] = torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[-1]), value=fill) for v in values])
        return out

    return collate


def estimation_dataloader(
    dataset: Sequence, config, collate_fn: Optional[Callable] = None, tokenizer=None, text_key: str = "text",
    shuffle: bool = False, seed: int = 0,
) -> DataLoader:
    """A DataLoader of at most `config.iters` batches of `config.bsz` examples from `dataset`, every sequence cut to
    `config.max_length` tokens.

    Examples are dicts of token sequences (`input_ids`, `attention_mask`, `labels`, ...), or, with `tokenizer`,
    dicts holding raw text under `text_key` (tokenized with truncation; labels = input_ids). `shuffle` draws the
    examples with a generator seeded by `seed`."""
    count = min(len(dataset), config.bsz * config.iters)
    if count == 0:
        raise ValueError("The estimation dataset is empty; LoRA-GA needs at least one batch.")
    if shuffle:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    else:
        order = list(range(count))
    subset = Subset(dataset, order)
    if tokenizer is not None:
        collate_fn = collate_fn or _text_collate(tokenizer, config.max_length, text_key)
    else:
        pad = pad_collate()
        inner = collate_fn or pad
        collate_fn = lambda rows: inner([{k: _cut(v, config.max_length) for k, v in r.items()} for r in rows])  # noqa: E731
    return DataLoader(subset, batch_size=config.bsz, shuffle=False, collate_fn=collate_fn)


def _text_collate(tokenizer, max_length: int, text_key: str) -> Callable[[list[dict]], dict]:
    def collate(rows: list[dict]) -> dict:
        enc = tokenizer([r[text_key] for r in rows], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        labels = enc["input_ids"].clone()
        if "attention_mask" in enc:
            labels[enc["attention_mask"] == 0] = -100
        return {**enc, "labels": labels}

    return collate


def estimation_batches(dataset: Sequence, config, **kwargs) -> list[dict]:
    """`estimation_dataloader(...)` as a list (handy to reuse the same batches, e.g. in benchmarks)."""
    return list(estimation_dataloader(dataset, config, **kwargs))
