"""Tests of asvp_ray.alignment: LogME, PED, LogME-PED and the refresh policies."""
from __future__ import annotations

import numpy as np
import pytest

from asvp_ray.alignment import (
    ALIGNMENT_SCORES,
    REFRESH_POLICIES,
    Decision,
    History,
    RoundState,
    alignment_scores,
    logme,
    logme_ped,
    ped_move,
    ped_trace,
)
from asvp_ray.core.errors import BadInputError, ConfigError


# --------------------------------------------------------------------------- helpers


def reference_logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME from the published formulas with explicit D x D matrices (no SVD)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    ftf = f.T @ f
    eye = np.eye(d)
    out = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        fty = f.T @ y
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            a_inv = np.linalg.inv(alpha * eye + beta * ftf)
            m = beta * a_inv @ fty
            gamma = np.trace(beta * ftf @ a_inv)
            m2 = m @ m
            res2 = np.sum((f @ m - y) ** 2)
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        a = alpha * eye + beta * ftf
        m = beta * np.linalg.solve(a, fty)
        _, logdet = np.linalg.slogdet(a)
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - n / 2 * np.log(2 * np.pi)
            - beta / 2 * np.sum((f @ m - y) ** 2)
            - alpha / 2 * (m @ m)
            - 0.5 * logdet
        )
        out.append(evidence / n)
    return float(np.mean(out))


def blobs(rng, n_per_class, centres, spread=1.0):
    """Gaussian blobs around the given class centres (C x D)."""
    centres = np.asarray(centres, dtype=np.float64)
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    feats = centres[labels] + spread * rng.normal(size=(labels.size, centres.shape[1]))
    return feats, labels


def class_mean_distance(features, labels, i=0, j=1):
    return float(np.linalg.norm(features[labels == i].mean(0) - features[labels == j].mean(0)))


def naive_ped_step(z, labels, dt=0.1, nsigma=0.6, constant=1.0):
    """One PED step with explicit loops over class pairs (standardised space)."""
    classes = np.unique(labels)
    mu = {c: z[labels == c].mean(0) for c in classes}
    rad = {c: np.sqrt(z[labels == c].var(0).sum()) for c in classes}
    out = z.copy()
    for i in classes:
        move = np.zeros(z.shape[1])
        for j in classes:
            if i == j:
                continue
            dist = np.linalg.norm(mu[i] - mu[j])
            overlap = max(nsigma * (rad[i] + rad[j]) - dist, 0.0)
            step = min(0.5 * dt * dt * constant * overlap, overlap)
            move += step * (mu[i] - mu[j]) / dist
        out[labels == i] += move
    return out


def released_ped(f, y, reference, dt=0.1, nsigma=0.6, constant=1.0, exit_ratio=0.5, max_steps=6):
    """PED as the authors' released code runs it (ASVP.md), written plainly with loops:
    class means and radii recomputed from the moved samples every step; a step's movement is
    the L1 norm of the per-class moves (each class once); a step whose movement is at most
    exit_ratio x the first step's is computed and thrown away, and the loop ends."""
    mean = reference.mean(0)
    std = np.maximum(reference.std(0), 1e-3)
    z = (np.asarray(f, dtype=np.float64) - mean) / std
    classes = list(np.unique(y))
    first = None
    for _ in range(max_steps):
        mu = {c: z[y == c].mean(0) for c in classes}
        rad = {c: np.sqrt(z[y == c].var(0).sum()) for c in classes}
        moves = {}
        for i in classes:
            move = np.zeros(z.shape[1])
            for j in classes:
                dist = np.linalg.norm(mu[i] - mu[j])
                if i == j or dist == 0:
                    continue
                overlap = max(nsigma * (rad[i] + rad[j]) - dist, 0.0)
                move += min(0.5 * dt * dt * constant * overlap, overlap) * (mu[i] - mu[j]) / dist
            moves[i] = move
        movement = sum(np.abs(moves[c]).sum() for c in classes)
        if first is None:
            first = movement
        elif movement <= exit_ratio * first:
            break
        for c in classes:
            z[y == c] += moves[c]
    return z * std + mean


def hist(*rows):
    """History from (round, n_labeled, logme[, refreshed[, refreshed_logme]]) tuples."""
    h = History()
    for row in rows:
        r, n, score = row[:3]
        refreshed = row[3] if len(row) > 3 else False
        after = {"logme": row[4]} if len(row) > 4 else None
        h.append(RoundState(round=r, n_labeled=n, scores={"logme": score},
                            refreshed=refreshed, refreshed_scores=after))
    return h


# --------------------------------------------------------------------------- LogME


@pytest.mark.parametrize("n,d", [(200, 50), (50, 200)])
@pytest.mark.parametrize("method", ["auto", "svd", "gram"])
def test_logme_unchanged_by_zero_columns(n, d, method):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = rng.integers(0, 4, size=n)
    padded = np.hstack([f, np.zeros((n, 100))])
    base = logme(f, y, method=method)
    assert np.isfinite(base)
    assert logme(padded, y, method=method) == pytest.approx(base, abs=1e-10)


@pytest.mark.parametrize("n,d", [(120, 20), (30, 60)])
def test_logme_matches_matrix_reference(n, d):
    # (120, 20): full rank, N > D. (30, 60): N < D, where the D - N null directions of
    # the D x D matrix formula must be counted exactly as logme does.
    rng = np.random.default_rng(1)
    f = rng.normal(size=(n, d)) + 0.5 * rng.normal(size=(1, d))
    y = rng.integers(0, 3, size=n)
    f[y == 1, :3] += 1.5  # some signal, so alpha/beta move far from 1
    ref = reference_logme(f, y)
    for method in ("auto", "svd", "gram"):
        assert logme(f, y, method=method) == pytest.approx(ref, abs=1e-8)


def test_logme_rank_deficient_matches_full_rank_features():
    # Exact zero channels (as in EfficientNet-Lite0 on small images) are null directions.
    rng = np.random.default_rng(2)
    f = rng.normal(size=(80, 10))
    y = rng.integers(0, 2, size=80)
    mixed = np.zeros((80, 25))
    mixed[:, ::5][:, :5] = f[:, :5]
    mixed[:, 1::5][:, :5] = f[:, 5:]
    assert logme(mixed, y) == pytest.approx(logme(f, y), abs=1e-10)


def test_logme_prefers_features_that_separate_labels():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, size=300)
    good = 3.0 * np.eye(5)[y] @ rng.normal(size=(5, 32)) + rng.normal(size=(300, 32))
    bad = rng.normal(size=(300, 32))
    assert logme(good, y) > logme(bad, y) + 0.1


def test_logme_ignores_absent_classes_and_checks_num_classes():
    rng = np.random.default_rng(4)
    f = rng.normal(size=(40, 6))
    y = rng.integers(0, 2, size=40)
    assert logme(f, y * 3, num_classes=10) == pytest.approx(logme(f, y), abs=1e-12)
    with pytest.raises(BadInputError, match="out of range"):
        logme(f, y * 3, num_classes=3)


def test_logme_accepts_float32_and_all_zero_features():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(30, 8)).astype(np.float32)
    y = np.arange(30) % 3
    assert logme(f, y) == pytest.approx(logme(f.astype(np.float64), y), abs=1e-12)
    assert np.isfinite(logme(np.zeros((30, 8)), y))


@pytest.mark.parametrize(
    "features,labels,match",
    [
        (np.zeros((10, 3)), np.zeros(9, dtype=int), "does not match"),
        (np.zeros((1, 3)), np.zeros(1, dtype=int), "at least 2 samples"),
        (np.zeros(10), np.zeros(10, dtype=int), "2-D"),
        (np.zeros((10, 3)), np.zeros((10, 1), dtype=int), "1-D"),
        (np.zeros((10, 3)), np.full(10, 0.5), "whole numbers"),
        (np.zeros((10, 3)), -np.ones(10, dtype=int), ">= 0"),
    ],
)
def test_logme_rejects_bad_inputs(features, labels, match):
    with pytest.raises(BadInputError, match=match):
        logme(features, labels)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_logme_rejects_non_finite(bad):
    f = np.ones((10, 3))
    f[4, 2] = bad
    with pytest.raises(BadInputError, match="row 4, column 2"):
        logme(f, np.arange(10) % 2)


def test_logme_rejects_unknown_method():
    with pytest.raises(BadInputError, match="method"):
        logme(np.ones((4, 2)), np.arange(4) % 2, method="qr")


# --------------------------------------------------------------------------- PED


def test_ped_moves_overlapping_classes_apart():
    rng = np.random.default_rng(10)
    f, y = blobs(rng, 50, [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.7, 0.0]])
    moved = ped_move(f, y)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert class_mean_distance(moved, y, i, j) > class_mean_distance(f, y, i, j)
    # Only translation per class: the within-class spread is unchanged.
    for c in range(3):
        np.testing.assert_allclose(moved[y == c].std(0), f[y == c].std(0), atol=1e-12)


def test_ped_leaves_separated_classes_unchanged():
    rng = np.random.default_rng(11)
    f, y = blobs(rng, 30, [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]], spread=0.5)
    result = ped_trace(f, y)
    assert np.array_equal(result.features, f)
    assert result.movements == (0.0,)  # first step moved nothing: stop at once


def test_ped_one_step_matches_naive_loop():
    rng = np.random.default_rng(12)
    f, y = blobs(rng, 20, rng.normal(size=(4, 5)) * 0.8)
    ref = rng.normal(size=(200, 5)) * 2.0 + 1.0
    mean, std = ref.mean(0), np.maximum(ref.std(0), 1e-3)
    expected = naive_ped_step((f - mean) / std, y, dt=0.5, nsigma=0.6, constant=2.0) * std + mean
    got = ped_move(f, y, reference=ref, dt=0.5, constant=2.0, max_steps=1)
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_ped_std_floor_for_constant_dimensions():
    rng = np.random.default_rng(13)
    f, y = blobs(rng, 20, [[0.0, 0.0], [0.3, 0.0]])
    f = np.hstack([f, np.ones((f.shape[0], 1))])  # std 0 -> floored, no division by 0
    moved = ped_move(f, y)
    assert np.isfinite(moved).all()
    np.testing.assert_allclose(moved[:, 2], 1.0, atol=1e-12)


def test_ped_respects_max_steps():
    rng = np.random.default_rng(14)
    f, y = blobs(rng, 40, [[0.0, 0.0], [0.2, 0.0]])
    for max_steps in (1, 3, 6):
        assert ped_trace(f, y, exit_ratio=0.0, max_steps=max_steps).steps == max_steps


def test_ped_respects_exit_ratio():
    rng = np.random.default_rng(15)
    f, y = blobs(rng, 40, [[0.0, 0.0], [0.2, 0.0]])
    # With 0.5 dt^2 a = 0.18 each step closes 36% of a two-class overlap, so the movement
    # falls geometrically (1, 0.64, 0.41, ...): the third step falls to exit_ratio=0.5 of the
    # first and is discarded, so two steps are applied.
    result = ped_trace(f, y, dt=0.6, constant=1.0, exit_ratio=0.5, max_steps=20)
    moves = result.movements
    assert result.steps == 2
    assert moves[1] > 0.5 * moves[0]
    assert result.discarded is not None and result.discarded <= 0.5 * moves[0]
    assert result.discarded == pytest.approx(moves[0] * 0.64**2, rel=0.05)
    # the discarded step is not applied: the same as stopping after two steps
    np.testing.assert_array_equal(result.features, ped_move(f, y, dt=0.6, exit_ratio=0.0, max_steps=2))
    # A stricter ratio needs more steps (0.64^6 > 0.1 >= 0.64^7).
    assert ped_trace(f, y, dt=0.6, constant=1.0, exit_ratio=0.1, max_steps=20).steps == 6


def test_ped_exit_rule_matches_released_algorithm_overlapping_classes_dt_035():
    # Four overlapping classes, PED standardised by a separate pool: at dt 0.35 the fourth
    # step's movement falls below half the first's, so the released code discards it.
    rng = np.random.default_rng(0)
    f, y = blobs(rng, 40, [[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.7, 0.0], [0.4, 0.5, 0.3]])
    pool = rng.normal(size=(300, 3)) * 1.5
    result = ped_trace(f, y, reference=pool, dt=0.35)
    assert result.steps == 3 and result.discarded is not None  # the exit rule fired
    assert result.discarded <= 0.5 * result.movements[0] < result.movements[-1]
    expected = released_ped(f, y, pool, dt=0.35)
    np.testing.assert_allclose(result.features, expected, atol=1e-12)
    # one step more (the discarded one applied) is a visibly different answer
    assert np.abs(ped_move(f, y, reference=pool, dt=0.35, exit_ratio=0.0, max_steps=4) - expected).max() > 0.01
    assert logme_ped(f, y, reference=pool, dt=0.35) == pytest.approx(logme(expected, y), abs=1e-12)


def test_ped_exit_rule_matches_released_algorithm_unequal_class_sizes_dt_025():
    # Five classes of 29 to 145 samples: a step's movement counts each class once, so the
    # small classes weigh as much as the big ones (a per-sample sum of displacements, with the
    # same discard rule, ends elsewhere here: 0.08 apart in the moved features).
    rng = np.random.default_rng(578)
    c, d = int(rng.integers(3, 6)), int(rng.integers(2, 6))
    sizes = rng.integers(5, 150, size=c)
    centres = rng.normal(size=(c, d)) * rng.uniform(0.3, 2.5)
    spread = rng.uniform(0.3, 1.5)
    y = np.concatenate([np.full(k, i) for i, k in enumerate(sizes)])
    f = centres[y] + spread * rng.normal(size=(y.size, d))
    assert sizes.max() > 4 * sizes.min()
    y = y * 3 + 7  # labels need not be 0..C-1
    result = ped_trace(f, y, dt=0.25)
    assert result.steps < 6 and result.discarded is not None
    expected = released_ped(f, y, f, dt=0.25)
    np.testing.assert_allclose(result.features, expected, atol=1e-12)
    # applying the discarded step too is a different answer
    assert np.abs(ped_move(f, y, dt=0.25, exit_ratio=0.0, max_steps=6) - expected).max() > 0.05
    assert logme_ped(f, y, dt=0.25) == pytest.approx(logme(expected, y), abs=1e-12)


def test_ped_default_parameters_match_released_algorithm_and_coinciding_means():
    rng = np.random.default_rng(19)
    f, y = blobs(rng, 30, rng.normal(size=(5, 8)) * 0.7)
    pool = rng.normal(size=(400, 8))
    np.testing.assert_allclose(ped_move(f, y, reference=pool), released_ped(f, y, pool), atol=1e-12)
    # N < D, as early labelled sets are
    g, z = blobs(rng, 4, rng.normal(size=(3, 40)) * 0.5)
    np.testing.assert_allclose(ped_move(g, z), released_ped(g, z, g), atol=1e-12)
    # two classes with the same mean have no direction to repel in: they stay put, no NaN
    h = np.vstack([f[y == 0], f[y == 0] * -1 + 2 * f[y == 0].mean(0)])
    k = np.repeat([0, 1], (y == 0).sum())
    moved = ped_move(h, k)
    assert np.isfinite(moved).all()
    np.testing.assert_allclose(moved, released_ped(h, k, h), atol=1e-12)


def test_ped_step_capped_at_overlap():
    rng = np.random.default_rng(16)
    f, y = blobs(rng, 40, [[0.0], [0.1]])
    mean, std = f.mean(0), f.std(0)
    z = (f - mean) / std
    radii = [np.sqrt(z[y == c].var(0).sum()) for c in (0, 1)]
    d0 = class_mean_distance(z, y)
    overlap = 0.6 * sum(radii) - d0
    assert overlap > 0
    # step = min(0.5 * 10^2 * overlap, overlap) = overlap; both classes move by it.
    moved = ped_move(f, y, dt=10.0, max_steps=1)
    d1 = class_mean_distance((moved - mean) / std, y)
    assert d1 == pytest.approx(d0 + 2 * overlap, rel=1e-10)


def test_logme_ped_and_alignment_scores():
    rng = np.random.default_rng(17)
    f, y = blobs(rng, 30, [[0.0, 0.0, 0.0], [0.4, 0.0, 0.0]])
    pool = rng.normal(size=(500, 3))
    got = alignment_scores(f, y, reference=pool)
    assert list(got) == ["logme", "logme_ped"]
    assert got["logme"] == pytest.approx(logme(f, y))
    assert got["logme_ped"] == pytest.approx(logme(ped_move(f, y, reference=pool), y))
    assert got["logme_ped"] > got["logme"]  # classes pushed apart fit the labels better
    assert logme_ped(f, y, max_steps=1) == pytest.approx(logme(ped_move(f, y, max_steps=1), y))
    assert set(ALIGNMENT_SCORES.names()) >= {"logme", "logme_ped"}


def test_ped_and_scores_reject_bad_inputs():
    f = np.random.default_rng(18).normal(size=(10, 3))
    y = np.arange(10) % 2
    with pytest.raises(BadInputError, match="reference: width 4"):
        ped_move(f, y, reference=np.zeros((5, 4)))
    with pytest.raises(BadInputError, match="does not match"):
        ped_move(f, y[:-1])
    with pytest.raises(ConfigError, match="max_steps"):
        ped_move(f, y, max_steps=0)
    with pytest.raises(ConfigError, match="dt"):
        ped_move(f, y, dt=-1.0)
    with pytest.raises(ConfigError, match="unknown PED parameter"):
        logme_ped(f, y, steps=3)
    with pytest.raises(ConfigError, match="Did you mean 'logme'"):
        alignment_scores(f, y, scores=("logm",))


# --------------------------------------------------------------------------- policies


def test_registry_lists_all_policies():
    assert REFRESH_POLICIES.names() == ["at_labels", "every_round", "never", "probe", "score_drop"]
    with pytest.raises(ConfigError, match="Did you mean 'score_drop'"):
        REFRESH_POLICIES.create("score_dorp")


def test_never_and_every_round():
    h = hist((0, 100, 0.5), (1, 200, 0.1))
    never = REFRESH_POLICIES.create("never").decide(h)
    every = REFRESH_POLICIES.create("every_round").decide(h)
    assert isinstance(never, Decision) and never.refresh is False
    assert every.refresh is True and "round 1" in every.reason


def test_at_labels_fires_once_per_threshold():
    policy = REFRESH_POLICIES.create("at_labels", at=[500, 250])
    assert policy.at == (250, 500)
    counts = [100, 200, 300, 400, 500, 600, 700]
    h = History()
    fired = []
    for r, n in enumerate(counts):
        h.append(RoundState(round=r, n_labeled=n, scores={}))
        d = policy.decide(h)
        h.mark_refreshed(d.refresh)
        fired.append(d.refresh)
        if d.refresh:
            assert d.scores["threshold"] in (250.0, 500.0)
    assert fired == [False, False, True, False, True, False, False]
    assert h.num_refreshes == 2 and h.last_refresh_round == 4 and h.labels_at_last_refresh == 500


def test_at_labels_two_thresholds_in_one_round_refresh_once():
    policy = REFRESH_POLICIES.create("at_labels", at=[150, 180])
    d = policy.decide(hist((0, 100, 0.0), (1, 200, 0.0)))
    assert d.refresh and "150, 180" in d.reason
    assert not policy.decide(hist((0, 100, 0.0), (1, 200, 0.0), (2, 300, 0.0))).refresh


def test_score_drop_fires_above_threshold():
    policy = REFRESH_POLICIES.create("score_drop", threshold=0.1, min_new_labels=0, max_refreshes=None)
    small = policy.decide(hist((0, 100, 1.0), (1, 200, 0.95)))
    assert not small.refresh and "<= threshold" in small.reason
    big = policy.decide(hist((0, 100, 1.0), (1, 200, 0.85)))
    assert big.refresh
    assert big.scores["drop"] == pytest.approx(0.15)
    assert big.scores["logme_baseline"] == 1.0 and big.scores["logme"] == 0.85
    assert "round 0" in big.reason


def test_score_drop_baseline_is_score_after_last_refresh():
    policy = REFRESH_POLICIES.create("score_drop", threshold=0.1, min_new_labels=0, max_refreshes=None)
    # Refresh at round 1 lifted logme from 0.8 to 1.5: later rounds compare with 1.5,
    # not with round 0's 1.0.
    h = hist((0, 100, 1.0), (1, 200, 0.8, True, 1.5), (2, 300, 1.45))
    assert h.score_at_last_refresh("logme") == 1.5
    assert not policy.decide(h).refresh
    h2 = hist((0, 100, 1.0), (1, 200, 0.8, True, 1.5), (2, 300, 1.3))
    d = policy.decide(h2)
    assert d.refresh and "after the refresh at round 1" in d.reason
    # Without refreshed_scores the first later measurement is the baseline.
    h3 = hist((0, 100, 1.0), (1, 200, 0.8, True), (2, 300, 1.4), (3, 400, 1.2))
    assert h3.score_at_last_refresh("logme") == 1.4
    assert policy.decide(h3).refresh


def test_score_drop_reference_options_and_the_recorded_reference():
    # round 0 measured on 100 labels is low (noisy); the score then rises and falls again
    rows = [(0, 100, 0.60), (1, 200, 0.90), (2, 300, 0.82), (3, 400, 0.70)]
    first = REFRESH_POLICIES.create("score_drop", threshold=0.1, max_refreshes=None)
    best = REFRESH_POLICIES.create("score_drop", threshold=0.1, max_refreshes=None, reference="best")
    late = REFRESH_POLICIES.create("score_drop", threshold=0.1, max_refreshes=None, reference="min_labels",
                                   reference_min_labels=200)
    decided = {}
    for name, policy in (("first", first), ("best", best), ("min_labels", late)):
        h = History()
        out = []
        for r, n, score in rows:
            h.append(RoundState(round=r, n_labeled=n, scores={"logme": score}))
            d = policy.decide(h)
            out.append(d)
            h.mark_refreshed(d.refresh, refreshed_scores={"logme": 1.0} if d.refresh else None)
        decided[name] = out
    # first: 0.70 is above round 0's 0.60, so it never fires
    assert [d.refresh for d in decided["first"]] == [False] * 4
    assert all(d.reference == {"mode": "first", "score": 0.6, "round": 0, "n_labeled": 100}
               for d in decided["first"])
    # best: 0.82 is 0.08 below the best 0.90 (no), 0.70 is 0.20 below it (refresh)
    assert [d.refresh for d in decided["best"]] == [False, False, False, True]
    assert decided["best"][3].reference == {"mode": "best", "score": 0.9, "round": 1, "n_labeled": 200}
    assert decided["best"][3].scores["drop"] == pytest.approx(0.2)
    assert "best reference: at round 1 (200 labels; never refreshed)" in decided["best"][3].reason
    # min_labels 200: no reference at 100 labels, then round 1's 0.90
    assert decided["min_labels"][0].reference is None and "no reference yet" in decided["min_labels"][0].reason
    assert [d.refresh for d in decided["min_labels"]] == [False, False, False, True]
    assert decided["min_labels"][2].reference["round"] == 1


def test_score_drop_best_reference_restarts_after_a_refresh():
    policy = REFRESH_POLICIES.create("score_drop", threshold=0.1, max_refreshes=None, reference="best")
    # refreshed to 1.5; the later 1.7 becomes the reference on the new features, round 1's 2.0
    # on the old features never counts
    h = hist((0, 100, 2.0), (1, 200, 1.0, True, 1.5), (2, 300, 1.7), (3, 400, 1.55))
    d = policy.decide(h)
    assert d.refresh and d.reference == {"mode": "best", "score": 1.7, "round": 2, "n_labeled": 300}
    late = REFRESH_POLICIES.create("score_drop", threshold=0.1, reference="min_labels", reference_min_labels=350)
    d = late.decide(hist((0, 100, 2.0), (1, 200, 1.0, True, 1.5), (2, 300, 1.7), (3, 400, 1.55)))
    assert not d.refresh and d.reference["round"] == 3  # the first score with >= 350 labels: itself
    with pytest.raises(ConfigError, match="reference='last'.*first, best, min_labels"):
        REFRESH_POLICIES.create("score_drop", reference="last")


def test_score_drop_blocked_by_min_new_labels():
    policy = REFRESH_POLICIES.create("score_drop", threshold=0.1, min_new_labels=500, max_refreshes=None)
    h = hist((0, 100, 1.0), (1, 300, 0.5))
    d = policy.decide(h)
    assert not d.refresh
    assert "min_new_labels" in d.reason and "200 new labels < 500" in d.reason
    assert d.scores["new_labels"] == 200.0
    assert policy.decide(hist((0, 100, 1.0), (1, 600, 0.5))).refresh


def test_score_drop_blocked_by_max_refreshes():
    policy = REFRESH_POLICIES.create("score_drop", threshold=0.1, min_new_labels=0, max_refreshes=1)
    h = hist((0, 100, 1.0), (1, 200, 0.5, True, 1.0), (2, 300, 0.5))
    d = policy.decide(h)
    assert not d.refresh
    assert "max_refreshes" in d.reason and "1 of 1" in d.reason
    assert d.scores["refreshes"] == 1.0


def test_score_drop_missing_score_names_the_fix():
    policy = REFRESH_POLICIES.create("score_drop", score="logme_ped")
    with pytest.raises(BadInputError, match="no 'logme_ped' score"):
        policy.decide(hist((0, 100, 1.0)))


def test_probe_uses_injected_probe_fn():
    policy = REFRESH_POLICIES.create("probe", margin=0.1, max_refreshes=1)
    assert policy.requires_probe
    h = hist((0, 100, 0.2), (1, 200, 0.3))
    calls = []

    def probe(history):
        calls.append(history.current.round)
        return {"logme": 0.5}

    d = policy.decide(h, probe=probe)
    assert d.refresh and calls == [1]
    assert d.scores["logme_probe"] == 0.5 and d.scores["gain"] == pytest.approx(0.2)
    no = policy.decide(h, probe=lambda history: {"logme": 0.35})
    assert not no.refresh and "<= margin" in no.reason
    # Budget spent: the (expensive) probe is not run at all.
    spent = hist((0, 100, 0.2, True, 0.4), (1, 200, 0.3))
    blocked = policy.decide(spent, probe=probe)
    assert not blocked.refresh and "max_refreshes" in blocked.reason and calls == [1]


def test_probe_without_probe_fn_or_bad_result():
    policy = REFRESH_POLICIES.create("probe")
    h = hist((0, 100, 0.2))
    with pytest.raises(ConfigError, match="needs a probe callable"):
        policy.decide(h)
    with pytest.raises(BadInputError, match="'logme' score"):
        policy.decide(h, probe=lambda history: {"other": 1.0})


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("at_labels", {}, "at=\\[\\]"),
        ("at_labels", {"at": [100, 0]}, "positive int"),
        ("at_labels", {"at": 100}, "list of label counts"),
        ("score_drop", {"threshold": -0.1}, "threshold"),
        ("score_drop", {"threshold": float("nan")}, "threshold"),
        ("score_drop", {"min_new_labels": 1.5}, "min_new_labels"),
        ("score_drop", {"max_refreshes": -1}, "max_refreshes"),
        ("score_drop", {"score": "accuracy"}, "logme, logme_ped"),
        ("probe", {"margin": -1}, "margin"),
        ("probe", {"bogus": 1}, "bogus"),
    ],
)
def test_policy_config_errors(name, kwargs, match):
    with pytest.raises((ConfigError, TypeError), match=match):
        REFRESH_POLICIES.create(name, **kwargs)


def test_history_validation():
    h = hist((0, 100, 0.0))
    with pytest.raises(BadInputError, match="does not come after"):
        h.append(RoundState(round=0, n_labeled=200))
    with pytest.raises(BadInputError, match="only grows"):
        h.append(RoundState(round=1, n_labeled=50))
    with pytest.raises(BadInputError, match="n_labeled"):
        RoundState(round=1, n_labeled=-5)
    with pytest.raises(BadInputError, match="History is empty"):
        REFRESH_POLICIES.create("never").decide(History())


def test_reference_moments_equal_numpy_and_do_not_copy_the_reference():
    """PED's standardisation over a pool reference: the chunked moments equal numpy's over the
    whole float64 matrix, and computing them allocates a small fraction of that matrix (the
    driver's monitor standardises with 20,000 pool rows: 205 MB as float64 at 1,280 dims)."""
    import tracemalloc

    from asvp_ray.alignment.ped import reference_moments

    rng = np.random.default_rng(4)
    ref = (rng.standard_normal((20000, 640)) * rng.uniform(0.1, 30, 640) + rng.uniform(-5, 5, 640)).astype(np.float32)
    tracemalloc.start()
    mean, std = reference_moments(ref, 640)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    whole = ref.astype(np.float64)
    np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, whole.std(0), rtol=1e-10)
    assert peak < whole.nbytes / 4, f"{peak / 2**20:.1f} MB allocated for a {whole.nbytes / 2**20:.1f} MB reference"
    bad = ref.copy()
    bad[4321, 7] = np.nan
    with pytest.raises(BadInputError, match="reference: NaN/inf value.*row 4321, column 7"):
        reference_moments(bad, 640)
    with pytest.raises(BadInputError, match="width 640 does not match features' 64"):
        reference_moments(ref, 64)
