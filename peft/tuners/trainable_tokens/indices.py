"""The one check of `trainable_token_indices` (LoRA's config field that TRL also sets after construction)."""

from __future__ import annotations

import numbers


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}={value!r}: expected {expected}.")


_TOKEN_IDS = "a non-empty list of distinct non-negative int token ids"


def check_trainable_token_indices(value) -> None:
    """Validate `trainable_token_indices`: None, a list of token ids, or a dict from module name to such a list.

    Called by `LoraConfig` and again when the adapter is injected (TRL assigns the field after construction).
    """
    if value is None:
        return
    expected = f"{_TOKEN_IDS}, or a dict from embedding module name to {_TOKEN_IDS}"
    if isinstance(value, dict):
        _check(len(value) > 0, "trainable_token_indices", value, expected)
        for name, ids in value.items():
            _check(isinstance(name, str) and name != "", "trainable_token_indices", value,
                   f"{expected} (module names are non-empty strings, got {name!r})")
            _check(_token_id_list(ids), f"trainable_token_indices[{name!r}]", ids, _TOKEN_IDS)
    else:
        _check(_token_id_list(value), "trainable_token_indices", value, expected)


def _token_id_list(ids) -> bool:
    if not isinstance(ids, (list, tuple)) or not ids:
        return False
    ints = all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in ids)
    return ints and len(set(ids)) == len(ids)
