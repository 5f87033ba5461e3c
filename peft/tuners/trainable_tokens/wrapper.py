"""`TrainableTokensWrapper`: an embedding (or a tied output layer) with a few rows trained per adapter.

The wrapper replaces the module in the model; the module itself lives at `token_adapter.base_layer` and the rows
at `token_adapter.trainable_tokens_delta.<adapter>` (upstream's in-memory names; on disk the adapter name is
dropped: `<path>.token_adapter.trainable_tokens_delta`).

It is an `AuxiliaryTrainingWrapper` (transformers' `load_adapter` asks it for its key map) and a `BaseTunerLayer`,
so the tuner's `set_adapter`, `merge_adapter`, `unmerge_adapter`, `merge_and_unload`, `unload`, `delete_adapter`,
`set_requires_grad` and `disable_adapter` treat it like an adapter layer.

Tied weights: when the output layer shares the embedding's weight (`tie_word_embeddings`), it gets a wrapper
*tied* to the embedding's: its `token_adapter` holds the embedding wrapper's containers (the same objects, as in
upstream), and it saves nothing. Merging writes the
rows into the shared weight once, so both layers see them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from ...utils.other import AuxiliaryTrainingWrapper
from ..tuners_utils import BaseTunerLayer
from .functional import check_disjoint, forward_with_rows, replace_rows
from .layer import TrainableTokensLayer


class TrainableTokensWrapper(AuxiliaryTrainingWrapper, BaseTunerLayer):
    """Forward: `module` computed with rows `token_indices[a]` of its weight replaced by the active adapters'
    `trainable_tokens_delta[a]`; disabled, merged or with no active adapter here: `module` itself."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(
        self, module: nn.Module, adapter_name: str, token_indices: Optional[Sequence[int]] = None,
        tied_to: Optional["TrainableTokensWrapper"] = None,
    ) -> None:
        super().__init__()
        if (token_indices is None) == (tied_to is None):
            raise ValueError("TrainableTokensWrapper needs either token_indices or tied_to, not both or neither.")
        self.token_adapter = TrainableTokensLayer(module)
        self._tied = [tied_to] if tied_to is not None else []  # a list: the other wrapper is not our submodule
        if tied_to is not None:  # the source's containers (upstream: `tied.token_adapter.X is source.token_adapter.X`)
            _share_containers(self.token_adapter, tied_to.token_adapter)
        self._active_adapter: Union[str, list[str]] = adapter_name
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        if token_indices is not None:
            self.update(adapter_name, token_indices)

    # --- structure ----------------------------------------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def original_module(self) -> nn.Module:  # upstream's name
        return self.token_adapter.base_layer

    @property
    def in_features(self) -> int:
        """Embedding: `num_embeddings`; a linear output layer: its own `in_features`."""
        base = self.base_layer
        return base.num_embeddings if isinstance(base, nn.Embedding) else base.in_features

    @property
    def out_features(self) -> int:
        base = self.base_layer
        return base.embedding_dim if isinstance(base, nn.Embedding) else base.out_features

    @property
    def tied_to(self) -> Optional["TrainableTokensWrapper"]:
        return self._tied[0] if self._tied else None

    def _rows_owner(self) -> "TrainableTokensWrapper":
        return self._tied[0] if self._tied else self

    @property
    def trainable_tokens_delta(self) -> nn.ParameterDict:
        return self._rows_owner().token_adapter.trainable_tokens_delta

    @property
    def trainable_tokens_original(self):
        return self._rows_owner().token_adapter.trainable_tokens_original

    @property
    def token_indices(self) -> dict[str, list[int]]:
        return self._rows_owner().token_adapter.token_indices

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("token_adapter", "_tied") or "_modules" not in self.__dict__:
                raise
            return getattr(self.token_adapter.base_layer, name)  # num_embeddings, padding_idx, embed_scale, ...

    def update(self, adapter_name: str, token_indices: Sequence[int]) -> None:
        """Add adapter `adapter_name` training rows `token_indices` (starting from the base rows)."""
        if self._tied:
            raise ValueError("A tied TrainableTokensWrapper has no rows of its own; update the wrapper it is tied to.")
        self.token_adapter.add_rows(adapter_name, token_indices)

    def check_set_adapter(self, adapter_names: Union[str, list[str]]) -> list[str]:
        """The names among `adapter_names` with rows here; adapters whose token ids overlap cannot be active
        together (their rows would replace the same rows of the matrix)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        held = [n for n in names if n in self.token_indices]
        try:
            check_disjoint(self.token_indices, held)
        except ValueError as exc:
            raise ValueError(f"Only one adapter can be set at a time for TrainableTokensWrapper when their token ids "
                             f"overlap: {exc}") from None
        return held

    def set_adapter(self, adapter_names: Union[str, list[str]]) -> None:
        """Activate (and make trainable) the named adapters that have rows here; `active_adapters` lists only those
        (as upstream: an adapter without rows here is not active on this layer)."""
        held = self.check_set_adapter(adapter_names)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().set_adapter(names)
        self._active_adapter = held

    def _active_with_rows(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.token_indices]

    # --- forward ------------------------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The weight the forward uses: the base parameter, or a tensor with the active adapters' rows in it."""
        base = self.base_layer
        names = [] if self.disable_adapters or self.merged else self._active_with_rows()
        if not names:
            return base.weight
        return replace_rows(base.weight, self._rows_owner().token_adapter.rows(names))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        names = [] if self.disable_adapters or self.merged else self._active_with_rows()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        check_disjoint(self.token_indices, names)
        return forward_with_rows(self.base_layer, self._rows_owner().token_adapter.rows(names), x, *args, **kwargs)

    # --- merge --------------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self._rows_owner().merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the named (default: active) adapters' rows into the base weight, keeping the originals.
        A tied wrapper does nothing: its weight is the embedding's, which that wrapper writes."""
        if self._tied:
            return
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        names = [n for n in names if n in self.token_indices and n not in self.merged_adapters]
        if not names:
            return
        check_disjoint(self.token_indices, self.merged_adapters + names)
        if safe_merge:
            broken = [n for n in names if not torch.isfinite(self.trainable_tokens_delta[n]).all()]
            if broken:
                raise ValueError(f"Merging adapters {broken} would put NaN/Inf into the embedding; nothing merged.")
        self._write(self.token_adapter.rows(names))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put the original rows back (a tied wrapper unmerges the wrapper it is tied to)."""
        if self._tied:
            if self.tied_to.merged:
                self.tied_to.unmerge()
            return
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            self._write(self.token_adapter.originals([self.merged_adapters.pop()]))

    def _write(self, rows) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():  # in place: a tied output layer holds the same tensor
            for index, values in rows:
                weight.index_copy_(0, index.to(weight.device), values.to(device=weight.device, dtype=weight.dtype))

    # --- adapter management -------------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's rows (putting the originals back first if merged); a tied wrapper drops them from
        the wrapper it is tied to, so the order in which the two are visited does not matter."""
        owner = self._rows_owner()
        if owner is not self:
            owner.delete_adapter(adapter_name)
        elif adapter_name in self.merged_adapters:
            self._write(self.token_adapter.originals([adapter_name]))
            self.merged_adapters.remove(adapter_name)
        super().delete_adapter(adapter_name)

    def adapter_state_dict_load_map(self, adapter_name: str) -> dict[str, str]:
        """Saved key -> in-memory key, both relative to this wrapper (what transformers' `load_adapter` renames).
        A tied wrapper saves nothing: its rows are the embedding wrapper's."""
        if self._tied or adapter_name not in self.token_indices:
            return {}
        return {"token_adapter.trainable_tokens_delta": f"token_adapter.trainable_tokens_delta.{adapter_name}"}

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> nn.Module:
        """Upstream's unloading entry point: merge if asked, then return the wrapped module."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.base_layer

    def extra_repr(self) -> str:
        return "tied: reads the rows of the embedding wrapper it follows" if self._tied else ""


def _share_containers(own: TrainableTokensLayer, source: TrainableTokensLayer) -> None:
    """Make `own`'s containers the very objects of `source`, as plain attributes, not submodules: the rows stay
    registered (saved, moved, counted) once, under the source."""
    for name in ("trainable_tokens_delta", "trainable_tokens_original"):
        del own._modules[name]
        object.__setattr__(own, name, getattr(source, name))
    own.token_indices = source.token_indices
