"""MLP proxy: learns, is deterministic, scores in chunks, follows the reference schedule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.proxy.mlp import MLPProxy, batch_bounds, cosine_lr_factor


def blobs(n: int = 400, d: int = 16, c: int = 3, seed: int = 0, spread: float = 3.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, spread, size=(c, d))
    y = rng.integers(0, c, size=n).astype(np.int64)
    X = (centers[y] + rng.normal(size=(n, d))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def data():
    X, y = blobs()
    return X[:200], y[:200], X[200:], y[200:]


FAST = dict(epochs=15, batch_size=32)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"linear": True},
        {"normalize": "l2"},
        {"normalize": "standardize"},
        {"hidden": 8, "normalize": "standardize"},
    ],
)
def test_learns_separable_problem(data, kw):
    Xtr, ytr, Xte, yte = data
    proxy = MLPProxy(**FAST, **kw)
    assert proxy.fit(Xtr, ytr) is proxy
    assert proxy.score(Xte, yte) > 0.9
    assert proxy.loss_history_[-1] < proxy.loss_history_[0]
    probs = proxy.predict_proba(Xte)
    assert probs.dtype == np.float32 and probs.shape == (len(Xte), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(proxy.predict(Xte), probs.argmax(axis=1))


def test_same_seed_identical_different_seed_differs(data):
    Xtr, ytr, Xte, _ = data
    a = MLPProxy(**FAST, seed=3).fit(Xtr, ytr).predict_proba(Xte)
    b = MLPProxy(**FAST, seed=3).fit(Xtr, ytr).predict_proba(Xte)
    c = MLPProxy(**FAST, seed=4).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_refit_reinitialises(data):
    Xtr, ytr, Xte, _ = data
    proxy = MLPProxy(**FAST)
    first = proxy.fit(Xtr, ytr).predict_proba(Xte)
    second = proxy.fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(first, second)


def test_fit_leaves_global_rng_alone(data):
    Xtr, ytr, _, _ = data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    MLPProxy(epochs=1).fit(Xtr, ytr)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("kw", [{}, {"normalize": "l2"}, {"normalize": "standardize"}, {"linear": True}])
def test_chunked_scoring_equals_unchunked(data, kw):
    Xtr, ytr, Xte, _ = data
    proxy = MLPProxy(**FAST, **kw).fit(Xtr, ytr)
    whole_p = proxy.predict_proba(Xte)
    whole_h = proxy.hidden_activations(Xte)
    proxy.set_params(chunk_size=7)
    np.testing.assert_allclose(proxy.predict_proba(Xte), whole_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(proxy.hidden_activations(Xte), whole_h, rtol=1e-5, atol=1e-5)
    h, p = proxy.embed_and_proba(Xte)
    np.testing.assert_allclose(p, whole_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, whole_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"normalize": "l2"}, {"normalize": "standardize"}, {"linear": True, "normalize": "l2"}])
def test_folded_scoring_matches_torch_module(data, kw):
    # Scoring folds BatchNorm and standardisation into the first layer; check it against
    # the trained module run the ordinary way.
    Xtr, ytr, Xte, _ = data
    proxy = MLPProxy(**FAST, **kw).fit(Xtr, ytr)
    net = proxy.module_
    with torch.no_grad():
        x = torch.from_numpy(Xte)
        if proxy.normalize == "l2":
            x = x / x.norm(dim=1, keepdim=True)
        elif proxy.normalize == "standardize":
            x = (x - torch.from_numpy(proxy.mean_)) / torch.from_numpy(proxy.scale_)
        expected = torch.softmax(net(x), dim=1).numpy()
        hidden = x.numpy() if proxy.linear else net[2](net[1](net[0](x))).numpy()
    np.testing.assert_allclose(proxy.predict_proba(Xte), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(proxy.hidden_activations(Xte), hidden, rtol=1e-4, atol=1e-4)


def test_hidden_activations_shape(data):
    Xtr, ytr, Xte, _ = data
    h = MLPProxy(**FAST, hidden=5).fit(Xtr, ytr).hidden_activations(Xte)
    assert h.shape == (len(Xte), 5) and h.dtype == np.float32 and (h >= 0).all()
    assert MLPProxy(**FAST).fit(Xtr, ytr).hidden_ == Xtr.shape[1]  # hidden=None means D


def test_lr_follows_7_16_cosine(data):
    Xtr, ytr, _, _ = data
    proxy = MLPProxy(epochs=4, batch_size=64, lr=0.2).fit(Xtr, ytr)
    steps_per_epoch = math.ceil(len(Xtr) / 64)
    total = 4 * steps_per_epoch
    assert proxy.n_steps_ == total == len(proxy.lr_history_)
    expected = [0.2 * max(0.0, math.cos(math.pi * 7 / 16 * s / total)) for s in range(total)]
    np.testing.assert_allclose(proxy.lr_history_, expected, rtol=1e-12)
    assert proxy.lr_history_[0] == 0.2
    # 7/16 of a half period: the last step is still well above zero.
    assert 0.2 * math.cos(math.pi * 7 / 16) < proxy.lr_history_[-1] < 0.2 * 0.3


def test_cosine_factor_values():
    assert cosine_lr_factor(0, 10) == 1.0
    assert cosine_lr_factor(10, 10) == pytest.approx(math.cos(math.pi * 7 / 16))
    assert cosine_lr_factor(20, 10) == 0.0  # cos(7 pi / 8) < 0, clipped at zero


def test_batch_of_one_is_merged_not_crashing():
    assert batch_bounds(33, 16) == [(0, 16), (16, 33)]
    assert batch_bounds(33, 16, merge_singleton=False)[-1] == (32, 33)
    assert batch_bounds(1, 16, merge_singleton=False) == [(0, 1)]
    X, y = blobs(n=33)
    proxy = MLPProxy(epochs=2, batch_size=16).fit(X, y)
    assert proxy.n_steps_ == 4


def test_single_sample(data):
    Xtr, ytr, _, _ = data
    with pytest.raises(BadInputError, match="at least 2 labelled samples"):
        MLPProxy(epochs=1).fit(Xtr[:1], ytr[:1])
    assert MLPProxy(epochs=1, linear=True).fit(Xtr[:1], ytr[:1], num_classes=3).predict_proba(Xtr).shape == (200, 3)


def test_num_classes_wider_than_labels(data):
    Xtr, ytr, Xte, _ = data
    proxy = MLPProxy(epochs=2).fit(Xtr, ytr, num_classes=10)
    assert proxy.predict_proba(Xte).shape == (len(Xte), 10)
    assert proxy.num_classes_ == 10


def test_bad_inputs(data):
    Xtr, ytr, _, _ = data
    X_nan = Xtr.copy()
    X_nan[5, 2] = np.nan
    with pytest.raises(BadInputError, match=r"NaN/inf.*row 5, column 2"):
        MLPProxy(epochs=1).fit(X_nan, ytr)
    X_inf = Xtr.copy()
    X_inf[0, 0] = np.inf
    with pytest.raises(BadInputError, match="NaN/inf"):
        MLPProxy(epochs=1).fit(X_inf, ytr)
    with pytest.raises(BadInputError, match=r"y\[0\] = 3 is outside \[0, 3\)"):
        MLPProxy(epochs=1).fit(Xtr, np.full(200, 3), num_classes=3)
    with pytest.raises(BadInputError, match="outside"):
        MLPProxy(epochs=1).fit(Xtr, np.full(200, -1))
    with pytest.raises(BadInputError, match="200 rows but y has 199"):
        MLPProxy(epochs=1).fit(Xtr, ytr[:-1])
    with pytest.raises(BadInputError, match="2-D"):
        MLPProxy(epochs=1).fit(Xtr[0], ytr)
    with pytest.raises(BadInputError, match="integer class indices"):
        MLPProxy(epochs=1).fit(Xtr, ytr.astype(np.float32))


def test_bad_scoring_inputs(data):
    Xtr, ytr, Xte, _ = data
    with pytest.raises(NotFittedError):
        MLPProxy().predict_proba(Xte)
    proxy = MLPProxy(epochs=1).fit(Xtr, ytr)
    with pytest.raises(BadInputError, match=r"shape \(N, 16\)"):
        proxy.predict_proba(Xte[:, :5])
    X_nan = Xte.copy()
    X_nan[9] = np.nan
    with pytest.raises(BadInputError, match="row 9"):
        proxy.set_params(chunk_size=4).predict_proba(X_nan)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"normalize": "zscore"}, "normalize"),
        ({"epochs": 0}, "epochs"),
        ({"hidden": 0}, "hidden"),
        ({"lr": -1.0}, "lr"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"device": "tpu:9"}, "device"),
    ],
)
def test_bad_params_raise_config_error_at_fit(data, kw, match):
    Xtr, ytr, _, _ = data
    proxy = MLPProxy(**kw)  # construction never validates (sklearn convention)
    with pytest.raises(ConfigError, match=match):
        proxy.fit(Xtr, ytr)


def test_accepts_float64_and_readonly_input(data):
    Xtr, ytr, Xte, _ = data
    proxy = MLPProxy(**FAST).fit(Xtr.astype(np.float64), ytr)
    ro = Xte.copy()
    ro.flags.writeable = False
    np.testing.assert_allclose(proxy.predict_proba(ro), proxy.predict_proba(Xte.astype(np.float64)), atol=1e-6)


def test_clone_keeps_params_drops_fit(data):
    Xtr, ytr, _, _ = data
    proxy = MLPProxy(hidden=7, normalize="l2", epochs=1).fit(Xtr, ytr)
    twin = clone(proxy)
    assert twin.get_params() == proxy.get_params()
    assert not hasattr(twin, "module_")
