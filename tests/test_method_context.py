"""The methods (asvp, standard, svpp) against a fake RoundContext: no driver, no Ray, no torch.

The fake has exactly the members of :class:`asvp_ray.methods.context.RoundContext`, so a method
that reached for anything else of the driver fails here with an AttributeError. Its fine-tunes
return fixed results, its timings are 0.25 s each, its feature versions are small numpy matrices
whose alignment with the labels is known: pool rows 0-99 of v0 cluster by class, rows 100-199 are
noise, and a refresh (v1) makes every row cluster by class.
"""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest

from asvp_ray.alignment import History, alignment_scores
from asvp_ray.config import load_config
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.methods import METHODS, RoundContext
from tests.conftest import ROOT, SMOKE

N, C, D = 200, 4, 6
TICK = 0.25  # seconds the fake's timed() adds per phase
TRAIN = {"cpus": 4.0, "gpus": 1.0}
EXTRACT = {"cpus": 2.0, "gpus": 0.5}


def _data():
    r = np.random.default_rng(7)
    truth = r.integers(0, C, N)
    ids = 1000 + 3 * np.arange(N)  # sorted, not row numbers
    clustered = r.normal(size=(C, D)) * 3
    v0 = np.where((np.arange(N) < 100)[:, None], clustered[truth] + 0.3 * r.normal(size=(N, D)),
                  r.normal(size=(N, D)))
    v1 = (r.normal(size=(C, D)) * 3)[truth] + 0.3 * r.normal(size=(N, D))
    return truth, ids, v0, v1


TRUTH, IDS, V0, V1 = _data()


def ckpt(tag: str) -> str:
    return f"ckpt/{tag}/model.pt"


class FakeVersions:
    """Feature versions in memory: v0 at start, v1 (all rows clustered) once extracted."""

    def __init__(self):
        self.ids, self.current, self.shards = IDS, 0, None
        self._features = {0: V0}
        self.extracted = []

    def rows(self, ids):
        rows = np.searchsorted(self.ids, ids)
        assert np.array_equal(self.ids[rows], ids)
        return rows

    def features_at(self, rows):
        return self._features[self.current][rows]

    def extract_resources(self):
        return dict(EXTRACT)

    def extract(self, version, *, checkpoint, phase, finetune_cost):
        self.extracted.append((version, checkpoint, phase, finetune_cost))
        self._features[version] = V1

    def switch_to(self, version):
        assert version in self._features
        self.current = version


class FakeLedger:
    def __init__(self):
        self.entries = []

    def add(self, phase, wall_s, cpus=1.0, gpus=0.0, round=None, **info):
        self.entries.append({"phase": phase, "wall_s": wall_s, "cpus": cpus, "gpus": gpus, "round": round, **info})


class FakeContext:
    """Exactly RoundContext's members; every service call is recorded in ``calls``."""

    def __init__(self, overrides=(), predictions=None):
        self.cfg = load_config(str(SMOKE), ["monitor.max_rows=50", "monitor.reference_rows=120", *overrides])
        self.next_round = 0
        self.labeled = {k: np.zeros(0, dtype=np.int64) for k in ("id", "label", "round")}
        self.versions = FakeVersions()
        self.history = History()
        self.ledger = FakeLedger()
        self._records, self._predictions, self.calls = [], predictions, []

    def round_records(self):
        return self._records

    @contextmanager
    def timed(self, seconds, phase, cpus=1.0, gpus=0.0, ledger_phase=None):
        self.calls.append(("timed", phase))
        yield
        seconds[phase] = round(seconds.get(phase, 0.0) + TICK, 4)
        self.ledger.add(ledger_phase or phase, TICK, cpus=cpus, gpus=gpus, round=self.next_round)

    def train_resources(self):
        return dict(TRAIN)

    def finetune(self, method, tag, evaluate):
        self.calls.append(("finetune", method, tag, evaluate))
        return SimpleNamespace(checkpoint=ckpt(tag), test_accuracy=0.625, seconds=7.5)

    def predict_pool(self, checkpoint):
        self.calls.append(("predict_pool", checkpoint))
        return self._predictions

    def embed_labeled(self, checkpoint):
        """v1's features of the labelled ids, in a shuffled order (as Ray Data returns them)."""
        self.calls.append(("embed_labeled", checkpoint))
        ids = np.random.default_rng(3).permutation(self.labeled["id"])
        return ids, V1[self.versions.rows(ids)]

    # --- the test's own helpers (not part of the context)
    def buy(self, r, rows):
        """Round ``r``'s labels: pool rows ``rows`` (their true classes)."""
        self.next_round = r
        self.labeled = {"id": np.concatenate([self.labeled["id"], IDS[rows]]),
                        "label": np.concatenate([self.labeled["label"], TRUTH[rows]]),
                        "round": np.concatenate([self.labeled["round"], np.full(len(rows), r)])}

    def round(self, method, r, rows):
        """Buy round ``r``'s labels, call the method's hook, record the round; returns ``(refreshed, seconds, extra)``."""
        self.buy(r, rows)
        seconds, extra = {}, {}
        refreshed = method.after_labels(r, seconds, extra)
        self._records.append({"round": r, "refreshed": refreshed})
        return refreshed, seconds, extra


CONTEXT_MEMBERS = {"cfg", "next_round", "labeled", "versions", "history", "ledger", "round_records", "timed",
                   "train_resources", "finetune", "predict_pool", "embed_labeled"}


def expected_alignment(cfg, labeled, feats, r):
    """The monitor's scores computed here from scratch: seeded subsamples of the labelled rows and
    of the pool (reference rows for PED), as ASVP.md describes."""
    m = cfg.monitor
    rng = np.random.default_rng([cfg.seed, r, 2])
    take = np.sort(rng.choice(len(labeled["id"]), m.max_rows, replace=False)) \
        if len(labeled["id"]) > m.max_rows else np.arange(len(labeled["id"]))
    ref = np.sort(rng.choice(N, m.reference_rows, replace=False))
    rows = np.searchsorted(IDS, labeled["id"][take])
    s = alignment_scores(feats[rows], labeled["label"][take], reference=feats[ref], scores=tuple(m.scores))
    return {k: round(float(v), 6) for k, v in s.items()}


def test_the_fake_is_a_round_context_and_nothing_more():
    ctx = FakeContext()
    assert isinstance(ctx, RoundContext)
    assert {k for k in dir(ctx) if not k.startswith("_")} - {"buy", "round", "calls"} == CONTEXT_MEMBERS
    proto = {k for k in dir(RoundContext) if not k.startswith("_")} | set(RoundContext.__annotations__)
    assert proto == CONTEXT_MEMBERS


def _drift(threshold_offset):
    """ASVP with score_drop: round 0 labels clustered rows, round 1 adds noise rows."""
    ctx = FakeContext(["method=asvp", "refresh.policy=score_drop", "refresh.reference=first"])
    m0 = expected_alignment(ctx.cfg, {"id": IDS[:40], "label": TRUTH[:40]}, V0, 0)
    both = np.r_[np.arange(40), np.arange(100, 140)]
    m1 = expected_alignment(ctx.cfg, {"id": IDS[both], "label": TRUTH[both]}, V0, 1)
    drop = m0["logme"] - m1["logme"]
    assert drop > 0.3  # the fake's drift is real: noise rows lower LogME
    ctx.cfg.refresh.threshold = drop + threshold_offset
    method = METHODS.create("asvp", ctx=ctx)
    refreshed0, seconds0, extra0 = ctx.round(method, 0, np.arange(40))
    assert not refreshed0 and extra0["alignment"] == m0 and seconds0 == {"monitor": TICK}
    assert extra0["decision_scores"]["drop"] == 0.0  # round 0 is its own reference
    return ctx, drop, m1, ctx.round(method, 1, np.arange(100, 140))


def test_asvp_refreshes_when_the_alignment_drop_crosses_the_threshold():
    ctx, drop, m1, (refreshed, seconds, extra) = _drift(-0.01)
    assert refreshed is True
    assert extra["alignment"] == m1 and extra["decision_scores"]["drop"] == pytest.approx(drop, abs=1e-9)
    assert extra["decision_scores"]["threshold"] == pytest.approx(drop - 0.01)
    assert "> threshold" in extra["decision"] and extra["decision_reference"]["round"] == 0
    # the refresh: one fine-tune, extraction into v1 with its checkpoint, then v1 is current
    assert [c for c in ctx.calls if c[0] == "finetune"] == [("finetune", "ft", "refresh-v1", False)]
    cost = {"wall_s": 7.5, **TRAIN, "checkpoint": ckpt("refresh-v1")}
    assert ctx.versions.extracted == [(1, ckpt("refresh-v1"), "refresh_extract", cost)]
    assert ctx.versions.current == 1
    assert extra["refresh"] == {"version": 1, "checkpoint": ckpt("refresh-v1"), "finetune_seconds": TICK,
                                "extract_seconds": TICK}
    # monitored again on v1, with the same seeded subsamples
    assert extra["alignment_after_refresh"] == expected_alignment(ctx.cfg, ctx.labeled, V1, 1)
    assert extra["alignment_after_refresh"]["logme"] > m1["logme"] + 0.3
    assert seconds == {"monitor": 2 * TICK, "refresh_finetune": TICK, "refresh_extract": TICK}
    r1 = [(e["phase"], e["cpus"], e["gpus"]) for e in ctx.ledger.entries if e["round"] == 1]
    assert r1 == [("monitor", 1.0, 0.0), ("refresh_finetune", 4.0, 1.0), ("refresh_extract", 2.0, 0.5),
                  ("monitor", 1.0, 0.0)]
    h = ctx.history
    assert len(h) == 2 and [s.refreshed for s in h] == [False, True]
    assert h[1].scores == m1 and h[1].refreshed_scores == extra["alignment_after_refresh"]


def test_asvp_keeps_the_features_when_the_drop_stays_under_the_threshold():
    ctx, drop, m1, (refreshed, seconds, extra) = _drift(+0.01)
    assert refreshed is False
    assert extra["alignment"] == m1 and extra["decision_scores"]["drop"] == pytest.approx(drop, abs=1e-9)
    assert "<= threshold" in extra["decision"] and "refresh" not in extra
    assert "alignment_after_refresh" not in extra
    assert not [c for c in ctx.calls if c[0] != "timed"] and ctx.versions.extracted == []
    assert ctx.versions.current == 0 and seconds == {"monitor": TICK}
    assert [s.refreshed for s in ctx.history] == [False, False]


def test_asvp_probe_refresh_reuses_the_probes_fine_tune():
    ctx = FakeContext(["method=asvp", "refresh.policy=probe", "refresh.margin=0.5"])
    method = METHODS.create("asvp", ctx=ctx)
    # noise rows in v0, bought in a shuffled order: v1's (probe's) features align far better
    rows = np.random.default_rng(5).permutation(np.arange(100, 160))
    refreshed, seconds, extra = ctx.round(method, 0, rows)
    assert refreshed is True
    probe_ckpt = ckpt("probe-r0")
    assert [c for c in ctx.calls if c[0] != "timed"] == [("finetune", "ft", "probe-r0", False),
                                                        ("embed_labeled", probe_ckpt)]
    order = np.argsort(IDS[rows])
    want = alignment_scores(V1[rows][order], TRUTH[rows][order], reference=None, scores=("logme", "logme_ped"))
    assert extra["decision_scores"]["logme_probe"] == pytest.approx(want["logme"], abs=1e-9)
    assert extra["decision_scores"]["gain"] == pytest.approx(want["logme"] - extra["alignment"]["logme"], abs=1e-6)
    assert extra["refresh"]["finetune_reused"] == probe_ckpt and extra["refresh"]["checkpoint"] == probe_ckpt
    assert ctx.versions.extracted[0][:3] == (1, probe_ckpt, "refresh_extract")
    assert seconds["refresh_finetune"] == 0.0 and seconds["probe"] == TICK
    reused = [e for e in ctx.ledger.entries if e["phase"] == "refresh_finetune"]
    assert reused == [{"phase": "refresh_finetune", "wall_s": 0.0, "cpus": 1.0, "gpus": 0.0, "round": 0,
                       "reused": probe_ckpt}]
    assert [(e["phase"], e["cpus"], e["gpus"]) for e in ctx.ledger.entries if e["phase"] == "probe"] == [
        ("probe", 4.0, 1.0)]


def test_asvp_probe_without_enough_gain_fine_tunes_once_and_keeps_v0():
    ctx = FakeContext(["method=asvp", "refresh.policy=probe", "refresh.margin=1000"])
    method = METHODS.create("asvp", ctx=ctx)
    refreshed, seconds, extra = ctx.round(method, 0, np.arange(100, 160))
    assert refreshed is False and "<= margin" in extra["decision"]
    assert [c[2] for c in ctx.calls if c[0] == "finetune"] == ["probe-r0"]
    assert ctx.versions.extracted == [] and ctx.versions.current == 0
    assert seconds == {"monitor": TICK, "probe": TICK}


def test_asvp_at_labels_and_its_auto_final():
    ctx = FakeContext(["method=asvp", "refresh.policy=at_labels", "refresh.at=[80]"])
    method = METHODS.create("asvp", ctx=ctx)
    assert method.auto_final()[0] == "lpft"
    got = [ctx.round(method, r, np.arange(40 * r, 40 * r + 40))[0] for r in range(3)]
    assert got == [False, True, False]
    assert [c[2] for c in ctx.calls if c[0] == "finetune"] == ["refresh-v1"]
    assert method.auto_final() == ("ft", "auto: features were refreshed, so FT (the labelled set is large "
                                         "enough to move them)")
    never = METHODS.create("asvp", ctx=FakeContext(["method=asvp", "refresh.policy=never"]))
    assert never.auto_final() == ("lpft", "auto: features were never refreshed, so LP-FT keeps the pre-trained "
                                          "information")
    assert METHODS.get("asvp").finetunes(never.ctx.cfg) is None and METHODS.get("asvp").extracts(never.ctx.cfg) is None
    assert "can fine-tune" in METHODS.get("asvp").finetunes(ctx.cfg)


def test_asvp_rejects_a_policy_its_config_cannot_run_when_built():
    with pytest.raises(ConfigError, match="refresh.at"):
        METHODS.create("asvp", ctx=FakeContext(["method=asvp", "refresh.policy=at_labels"]))
    with pytest.raises(ConfigError, match="not computed by the monitor"):
        METHODS.create("asvp", ctx=FakeContext(["method=asvp", "refresh.score=logme_ped", "monitor.scores=[logme]"]))


def _predictions(ids):
    """Probabilities the fake model gives: row k of ``probs`` belongs to ``ids[k]``."""
    p = np.random.default_rng(11).random((len(ids), C))
    return ids, p / p.sum(axis=1, keepdims=True)


def test_standard_scores_the_pool_with_the_model_it_fine_tuned():
    shuffled = np.random.default_rng(2).permutation(IDS)
    ids, probs = _predictions(shuffled)
    ctx = FakeContext(["method=standard"], predictions=(ids, probs))
    method = METHODS.create("standard", ctx=ctx)
    ctx.buy(1, np.arange(40))
    seconds, extra = {}, {}
    out = method.pool_probs(seconds, extra)
    assert [c for c in ctx.calls if c[0] != "timed"] == [("finetune", "ft", "round-1", True),
                                                        ("predict_pool", ckpt("round-1"))]
    # row k of the result is the prediction for pool id IDS[k] (the feature rows' order)
    want = np.stack([probs[list(ids).index(i)] for i in IDS])
    np.testing.assert_array_equal(out, want)
    assert extra == {"finetune_test_accuracy": 0.625, "checkpoint": ckpt("round-1")}
    assert seconds == {"finetune": TICK, "score_pool": TICK}
    assert [(e["phase"], e["cpus"], e["gpus"], e["round"]) for e in ctx.ledger.entries] == [
        ("finetune", 4.0, 1.0, 1), ("score_pool", 2.0, 0.5, 1)]
    assert method.after_labels(1, {}, {}) is False and len(ctx.calls) == 4  # nothing more ran
    assert method.auto_final() == ("ft", "auto: standard trains the final model with FT")
    assert method.policy.name == "never"


def test_standard_refuses_predictions_for_other_ids():
    ctx = FakeContext(["method=standard"], predictions=_predictions(np.r_[IDS[:-1], 1]))
    with pytest.raises(RunDirError, match="do not match"):
        METHODS.create("standard", ctx=ctx).pool_probs({}, {})


class Untouchable(FakeContext):
    """A context whose services fail: svpp must use none of them."""

    def _refuse(self, *a, **k):
        raise AssertionError("svpp used a service of the context")

    timed = finetune = predict_pool = embed_labeled = train_resources = _refuse


def test_svpp_never_refreshes_and_asks_the_context_for_nothing():
    ctx = Untouchable(["method=svpp"])
    method = METHODS.create("svpp", ctx=ctx)
    for r in range(3):
        seconds, extra = {}, {}
        assert method.pool_probs(seconds, extra) is None
        assert ctx.round(method, r, np.arange(40 * r, 40 * r + 40)) == (False, {}, {})
    assert len(ctx.history) == 0 and ctx.versions.current == 0 and ctx.ledger.entries == []
    assert method.policy.name == "never"
    assert method.auto_final() == ("ft", "auto: svpp trains the final model with FT")
    assert METHODS.get("svpp").finetunes(ctx.cfg) is None and METHODS.get("svpp").extracts(ctx.cfg) is None


def test_methods_run_without_ray():
    """Every test above, in a fresh interpreter: Ray (and torch) never imported, no Ray session."""
    code = (
        "import sys\n"
        "import tests.test_method_context as t\n"
        "for name in sorted(dir(t)):\n"
        "    if name.startswith('test_') and name != 'test_methods_run_without_ray':\n"
        "        getattr(t, name)()\n"
        "        print('passed', name)\n"
        "print('imported', sorted(m for m in ('ray', 'torch') if m in sys.modules))\n"
        "import ray\n"
        "print('initialized', ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("passed ") for line in lines) == 10, out.stdout
    assert "imported []" in lines and "initialized False" in lines
