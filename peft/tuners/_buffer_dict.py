"""`BufferDict`: a dict of tensors registered as module buffers (the buffer analogue of `nn.ParameterDict`).

Entries follow the module (`.to()`, `.half()`, `state_dict()` when `persistent=True`) but are never trained.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Iterator, Optional, Union

import torch
from torch import nn

_Items = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


class BufferDict(nn.Module):
    """Maps names to tensors held as buffers of this module.

    `persistent` (default False) says whether the buffers appear in `state_dict()`. `update` keeps the order of an
    `OrderedDict`, another `BufferDict` or a sequence of pairs; a plain mapping's entries are added in sorted key
    order (upstream's behaviour).
    """

    def __init__(self, buffers: Optional[_Items] = None, persistent: bool = False) -> None:
        super().__init__()
        self.persistent = persistent
        if buffers is not None:
            self.update(buffers)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def items(self):
        return self._buffers.items()

    def clear(self) -> None:
        for key in list(self._buffers):
            del self[key]

    def pop(self, key: str) -> torch.Tensor:
        value = self[key]
        del self[key]
        return value

    def update(self, buffers: _Items) -> None:
        """Add or overwrite entries from a mapping or an iterable of `(name, tensor)` pairs."""
        if not isinstance(buffers, Iterable):
            raise TypeError(f"BufferDict.update expects a mapping or an iterable of (name, tensor) pairs, got "
                            f"{type(buffers).__name__}")
        if isinstance(buffers, (OrderedDict, BufferDict)):
            pairs = list(buffers.items())
        elif isinstance(buffers, Mapping):
            pairs = sorted(buffers.items())
        else:
            pairs = list(buffers)
        for index, pair in enumerate(pairs):
            if not isinstance(pair, Iterable) or isinstance(pair, (str, torch.Tensor)):
                raise TypeError(f"BufferDict.update: element #{index} should be a (name, tensor) pair, got "
                                f"{type(pair).__name__}")
            pair = tuple(pair)
            if len(pair) != 2:
                raise ValueError(f"BufferDict.update: element #{index} has length {len(pair)}; 2 is required")
            self[pair[0]] = pair[1]

    def extra_repr(self) -> str:
        lines = []
        for key, value in self._buffers.items():
            shape = "x".join(str(size) for size in value.shape)
            where = "" if value.device.type == "cpu" else f" ({value.device})"
            lines.append(f"  ({key}): Buffer containing: [{torch.typename(value)} of size {shape}{where}]")
        return "\n".join(lines)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("BufferDict should not be called.")
