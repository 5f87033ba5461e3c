"""KronA on `nn.Conv2d` (groups=1): the kernel, flattened to `out x (in * kh * kw)`, gets `s * kron(A, B)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kron_math import FactorSpec, kron_delta
from .layer import KronALayer


class Conv2d(nn.Module, KronALayer):
    """`y = conv(x, W + s * reshape(kron(A, B)))`: A is (a1, a2), B is (out / a1, in * kh * kw / a2).

    The branch convolves with the `s * kron(A, B)` kernel (as large as the base kernel, formed per forward): a
    convolution has no reshape trick as cheap as the linear one (it would need the unfolded input).
    """

    def __init__(self, base_layer: nn.Conv2d, adapter_name: str, krona_dim: FactorSpec = None,
                 krona_scale: float = 1.0, krona_dropout: float = 0.0, init_weights=True, fan_in_fan_out: bool = False,
                 where: str = "") -> None:
        if base_layer.groups != 1:
            raise ValueError(f"Invalid target module{where}: Conv2d with groups={base_layer.groups}; expected "
                             "groups=1 (KronA flattens the whole kernel).")
        super().__init__()
        KronALayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, krona_dim, krona_scale, krona_dropout, init_weights, where)

    def _features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        kh, kw = base.kernel_size
        return base.in_channels * kh * kw, base.out_channels

    def _conv_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.get_base_layer()
        A, B = self.krona_A[name], self.krona_B[name]
        kernel = kron_delta(A, B, self.scaling[name]).reshape(base.weight.shape)
        h = self.krona_dropout[name](x.to(A.dtype) if getattr(self, "cast_input_dtype_enabled", True) else x)
        if base.padding_mode != "zeros":
            pad = base._reversed_padding_repeated_twice
            return F.conv2d(F.pad(h, pad, mode=base.padding_mode), kernel, None, base.stride, 0, base.dilation)
        return F.conv2d(h, kernel, None, base.stride, base.padding, base.dilation)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.krona_A:
                result = result + self._conv_delta(x, name).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "krona." + super().__repr__()
