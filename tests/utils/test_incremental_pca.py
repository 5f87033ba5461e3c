"""IncrementalPCA against a full PCA (SVD of the centered, concatenated data), in float64."""

import pytest
import torch

from peft.utils.incremental_pca import IncrementalPCA, flip_signs, merge_moments

D = torch.float64


def _pca(X, k):
    centered = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    total = centered.square().sum()
    return flip_signs(Vh)[:k], S[:k], (S.square() / total)[:k]


def _data(n=60, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=D)[:p]
    return torch.randn(n, p, generator=g, dtype=D) * scales + torch.arange(p, dtype=D)


def test_merge_moments_equals_moments_of_concatenation():
    X = _data()
    mean, var = merge_moments(None, None, 0, X[:17])
    mean, var = merge_moments(mean, var, 17, X[17:])
    torch.testing.assert_close(mean, X.mean(0))
    torch.testing.assert_close(var, X.var(0, unbiased=False))


@pytest.mark.parametrize("batch_size", [10, 17, 60])
def test_full_rank_fit_equals_pca_of_all_rows(batch_size):
    X = _data()
    ipca = IncrementalPCA(n_components=5, batch_size=batch_size).fit(X)
    V, S, ratio = _pca(X, 5)
    torch.testing.assert_close(ipca.components_, V)
    torch.testing.assert_close(ipca.singular_values_, S)
    torch.testing.assert_close(ipca.explained_variance_ratio_, ratio)
    torch.testing.assert_close(ipca.explained_variance_, S.square() / (X.shape[0] - 1))
    torch.testing.assert_close(ipca.transform(X), (X - X.mean(0)) @ V.T)


def test_partial_fit_equals_fit_and_low_rank_close_to_pca():
    X = _data(n=200)
    fit = IncrementalPCA(n_components=2, batch_size=25).fit(X)
    part = IncrementalPCA(n_components=2)
    for start in range(0, 200, 25):
        part.partial_fit(X[start:start + 25])
    torch.testing.assert_close(fit.components_, part.components_)
    V, _, _ = _pca(X, 2)
    assert torch.nn.functional.cosine_similarity(fit.components_, V).abs().min() > 0.99


def test_lowrank_matches_full_svd():
    X = _data()
    full = IncrementalPCA(n_components=2, batch_size=20).fit(X)
    low = IncrementalPCA(n_components=2, batch_size=20, lowrank=True, lowrank_q=5, lowrank_seed=0).fit(X)
    torch.testing.assert_close(full.components_, low.components_)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="n_components=4 invalid for n_features=3"):
        IncrementalPCA(4).fit(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="less or equal to the batch number of samples 2"):
        IncrementalPCA(3).partial_fit(torch.zeros(2, 3))
    ipca = IncrementalPCA().fit(torch.randn(10, 4))
    with pytest.raises(ValueError, match="features"):
        ipca.partial_fit(torch.randn(10, 5))
    with pytest.raises(ValueError, match="n_components must be specified"):
        IncrementalPCA(lowrank=True)
