"""Incremental PCA in torch (upstream's `peft.utils.incremental_pca.IncrementalPCA`; used by EVA).

Ross et al. 2008 / scikit-learn's scheme: after seeing `N` rows with mean `mu` and a rank-k basis `V_k` (k, p) with
singular values `S_k`, a new batch `X` (n, p) with mean `mu_b` is folded in by one thin SVD of the stacked matrix

    [ S_k[:, None] * V_k ;  X - mu_b ;  sqrt(N n / (N + n)) (mu - mu_b) ]      ((k + n + 1), p)

whose Gram matrix equals the centered scatter of all `N + n` rows projected on the kept subspace plus the new rows,
so with k = p the result is exactly the PCA of the concatenated data. Signs follow the largest-|.| entry of each
component (positive), so they do not depend on how the data was batched.
"""

from __future__ import annotations

from typing import Optional

import torch


# --- pure math ----------------------------------------------------------------------------------------------------
def merge_moments(mean: Optional[torch.Tensor], var: Optional[torch.Tensor], count: int, batch: torch.Tensor):
    """Column mean and (biased) variance of the old rows (`count`, `mean`, `var`) and `batch` (n, p) together."""
    n = batch.shape[0]
    b_mean = batch.mean(dim=0)
    b_var = batch.var(dim=0, unbiased=False)
    if count == 0 or mean is None:
        return b_mean, b_var
    total = count + n
    delta = b_mean - mean
    new_mean = mean + delta * (n / total)
    m2 = var * count + b_var * n + delta.square() * (count * n / total)
    return new_mean, m2 / total


def flip_signs(Vh: torch.Tensor) -> torch.Tensor:
    """Rows of `Vh` (k, p) multiplied by the sign of their largest-magnitude entry."""
    idx = Vh.abs().argmax(dim=1)
    signs = torch.sign(Vh[torch.arange(Vh.shape[0], device=Vh.device), idx])
    signs[signs == 0] = 1
    return Vh * signs[:, None]


def stacked_update(components, singular_values, mean, count: int, batch: torch.Tensor) -> torch.Tensor:
    """The matrix whose SVD gives the PCA of the old rows and `batch` (see the module docstring)."""
    b_mean = batch.mean(dim=0)
    if count == 0 or components is None:
        return batch - b_mean
    n = batch.shape[0]
    correction = ((count * n / (count + n)) ** 0.5) * (mean - b_mean)
    return torch.cat([singular_values[:, None] * components, batch - b_mean, correction[None, :]], dim=0)


class IncrementalPCA:
    """PCA fitted batch by batch (`partial_fit`) or over minibatches of one tensor (`fit`).

    Args: n_components (None: min(n_samples, n_features) of the first batch), copy (clone inputs), batch_size
    (`fit`'s minibatch; None: 5 * n_features), svd_driver (for `torch.linalg.svd`), lowrank (use
    `torch.svd_lowrank` with `lowrank_q` columns, default 2 * n_components, `lowrank_niter` iterations and an optional
    `lowrank_seed`).

    Fitted attributes (sklearn's names): components_ (k, p), singular_values_, mean_, var_, n_samples_seen_,
    explained_variance_, explained_variance_ratio_, noise_variance_.
    """

    def __init__(self, n_components: Optional[int] = None, copy: Optional[bool] = True,
                 batch_size: Optional[int] = None, svd_driver: Optional[str] = None, lowrank: bool = False,
                 lowrank_q: Optional[int] = None, lowrank_niter: int = 4, lowrank_seed: Optional[int] = None):
        self.n_components = n_components
        self.copy = copy
        self.batch_size = batch_size
        self.svd_driver = svd_driver
        self.lowrank = lowrank
        self.lowrank_q = lowrank_q
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.n_features_ = None
        if lowrank:
            if lowrank_q is None:
                if n_components is None:
                    raise ValueError("n_components must be specified when using lowrank mode with lowrank_q=None.")
                self.lowrank_q = 2 * n_components
            elif n_components is not None and lowrank_q < n_components:
                raise ValueError(f"lowrank_q={lowrank_q} must be greater than or equal to n_components="
                                 f"{n_components}.")

    def _checked(self, X) -> torch.Tensor:
        X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else (X.clone() if self.copy else X)
        if X.dim() != 2:
            raise ValueError(f"IncrementalPCA expects a 2-D (n_samples, n_features) tensor, got {tuple(X.shape)}.")
        n_samples, n_features = X.shape
        k = self.n_components
        if k is not None and k > n_features:
            raise ValueError(f"n_components={k} invalid for n_features={n_features}, need more rows than columns for "
                             "IncrementalPCA processing.")
        if k is not None and k > n_samples:
            raise ValueError(f"n_components={k} must be less or equal to the batch number of samples {n_samples}")
        return X if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)

    def _svd(self, M: torch.Tensor):
        if not self.lowrank:
            return torch.linalg.svd(M, full_matrices=False, driver=self.svd_driver)
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(devices=[] if M.device.type == "cpu" else None, enabled=seeded):
            if seeded:
                torch.manual_seed(self.lowrank_seed)
            U, S, V = torch.svd_lowrank(M, q=min(self.lowrank_q, *M.shape), niter=self.lowrank_niter)
        return U, S, V.mH

    def fit(self, X, check_input: bool = True) -> "IncrementalPCA":
        """Fit on `X` (n, p) in minibatches of `batch_size` (the last one merged if smaller than n_components)."""
        if check_input:
            X = self._checked(X)
        n_samples, n_features = X.shape
        if self.batch_size is None:
            self.batch_size = 5 * n_features
        for batch in self.gen_batches(n_samples, int(self.batch_size), min_batch_size=self.n_components or 0):
            self.partial_fit(X[batch], check_input=False)
        return self

    def partial_fit(self, X, check_input: bool = True) -> "IncrementalPCA":
        """Fold the batch `X` (n, p) into the fit."""
        if check_input:
            X = self._checked(X)
        n_samples, n_features = X.shape
        first = not hasattr(self, "components_")
        if first:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
            self.n_features_ = n_features
            if self.n_components is None:
                self.n_components = min(n_samples, n_features)
            self.components_, self.singular_values_ = None, None
        elif n_features != self.n_features_:
            raise ValueError(f"Number of features of the new batch ({n_features}) does not match the number of "
                             f"features seen so far ({self.n_features_}).")
        count = int(self.n_samples_seen_.item())
        stacked = stacked_update(self.components_, self.singular_values_, self.mean_, count, X)
        mean, var = merge_moments(self.mean_, self.var_, count, X)
        total = count + n_samples
        _, S, Vh = self._svd(stacked)
        Vh = flip_signs(Vh)
        variance = S.square() / (total - 1)
        ratio = S.square() / (var * total).sum()
        k = self.n_components
        self.n_samples_seen_ = torch.tensor([total], device=X.device)
        self.components_, self.singular_values_ = Vh[:k], S[:k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_, self.explained_variance_ratio_ = variance[:k], ratio[:k]
        if k not in (n_samples, n_features) and variance.shape[0] > k:
            self.noise_variance_ = variance[k:].mean()
        else:
            self.noise_variance_ = torch.tensor(0.0, device=X.device)
        return self

    def transform(self, X) -> torch.Tensor:
        """Project `X` (n, p) onto the components: `(X - mean_) @ components_^T` (n, k)."""
        X = torch.as_tensor(X, dtype=self.components_.dtype, device=self.components_.device)
        return (X - self.mean_) @ self.components_.T

    @staticmethod
    def gen_batches(n: int, batch_size: int, min_batch_size: int = 0):
        """Slices covering range(n) in steps of `batch_size`; a last slice shorter than `min_batch_size` is merged
        into the one before."""
        start = 0
        for _ in range(n // batch_size):
            end = start + batch_size
            if end + min_batch_size > n:
                continue
            yield slice(start, end)
            start = end
        if start < n:
            yield slice(start, n)
