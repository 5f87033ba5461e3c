"""Pure tensor functions of trainable tokens: the outputs of a layer whose weight has some rows replaced.

With `W'` equal to `W` except `W'[t_i] = D[i]` (token ids t: (k,), new rows D: (k, dim)):

    embedding:  E'[x] = D[i] where x == t_i, else E[x]        (only the looked-up positions change)
    linear:     x W'^T + b = (x W^T + b) with column t_i set to x D[i]^T + b[t_i]

Both cost O(k) extra work instead of materialising `W'` (vocab x dim, plus a vocab x dim gradient); other layer
types (e.g. an embedding subclass that scales its output) fall back to running the layer with `W'`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Rows = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (index (k,) long, values (k, dim)) per adapter


def replace_rows(weight: torch.Tensor, rows: Rows) -> torch.Tensor:
    """`W'`: `weight` with `weight[index] = values` for each pair; out of place, so gradients reach `values` only.
    weight: (n, dim); values cast to weight's dtype."""
    for index, values in rows:
        weight = weight.index_copy(0, index.to(weight.device), values.to(device=weight.device, dtype=weight.dtype))
    return weight


def embedding_with_rows(out: torch.Tensor, ids: torch.Tensor, index: torch.Tensor, values: torch.Tensor):
    """`out` = E[ids] (..., dim) with the positions whose id is in `index` (k,) read from `values` (k, dim)."""
    hit = ids.unsqueeze(-1) == index.to(ids.device)  # (..., k)
    slot = hit.int().argmax(-1)  # (...) position in index (0 where there is no hit)
    new = values.to(device=out.device, dtype=out.dtype)[slot]  # (..., dim)
    return torch.where(hit.any(-1, keepdim=True), new, out)


def linear_with_rows(out: torch.Tensor, x: torch.Tensor, bias, index: torch.Tensor, values: torch.Tensor):
    """`out` = x W^T + b (..., n) with output columns `index` (k,) recomputed from the rows `values` (k, in)."""
    index = index.to(out.device)
    cols = F.linear(x, values.to(device=x.device, dtype=x.dtype), None if bias is None else bias[index])  # (..., k)
    return out.index_copy(-1, index, cols.to(out.dtype))


def forward_with_rows(base: nn.Module, rows: Rows, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`base(x)` computed as if `base.weight` had `rows` replaced."""
    plain = not args and not kwargs
    if plain and type(base) is nn.Embedding and base.max_norm is None:
        out = base(x)
        for index, values in rows:
            out = embedding_with_rows(out, x, index, values)
        return out
    if plain and type(base) is nn.Linear:
        out = base(x)
        for index, values in rows:
            out = linear_with_rows(out, x, base.bias, index, values)
        return out
    weight = replace_rows(base.weight, rows)
    return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)


def check_disjoint(token_indices: dict[str, list[int]], adapter_names: Sequence[str]) -> None:
    """Adapters that replace rows of one matrix together (active or merged at once) need disjoint token ids."""
    seen: dict[int, str] = {}
    for name in adapter_names:
        for token in token_indices[name]:
            if seen.get(token, name) != name:
                raise ValueError(
                    f"Adapters {seen[token]!r} and {name!r} both train token {token} of this embedding; adapters "
                    "that are active or merged together need disjoint trainable_token_indices."
                )
            seen[token] = name
