"""The public Python API (asvp_ray.api, exported by the package): a run from a config mapping,
read back as objects; resumed and found finished; the same run the CLI makes; a light import."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml

import asvp_ray
from asvp_ray.core.errors import ConfigError, RunDirError
from tests.conftest import ROOT, SMOKE

SETS = ["budget.schedule=[30,20,20]", "proxy.epochs=10", "final.training_method=none"]


def test_import_is_light_and_exports_the_api():
    code = ("import sys, asvp_ray; heavy = [m for m in ('torch', 'ray', 'timm') if m in sys.modules]; "
            "print(heavy, sorted(asvp_ray.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.startswith("[]"), out
    for name in ("run", "resume", "result", "status", "label", "report_runs", "study", "Config", "load_config"):
        assert name in out and callable(getattr(asvp_ray, name))
    with pytest.raises(AttributeError):
        asvp_ray.no_such_name  # noqa: B018


def test_run_from_a_mapping_returns_the_run_and_a_second_call_finds_it_finished(ray_local, feature_cache, tmp_path):
    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    raw = yaml.safe_load(SMOKE.read_text())
    raw["feature_cache"] = str(feature_cache)
    events = []
    res = asvp_ray.run(raw, tmp_path / "run", overrides=SETS, progress=lambda e, d: events.append((e, d)))
    assert res.finished and not res.already_finished
    assert [e for e, _ in events] == ["round", "round", "round"]
    assert [r["n_labeled"] for r in res.rounds] == [30, 50, 70]
    assert [d["round"] for _, d in events] == [0, 1, 2]
    ids, labels = res.labeled["id"], res.labeled["label"]
    assert len(ids) == len(set(ids.tolist())) == 70
    truth = FashionMNISTSource(split="train", limit=int(raw["data"]["pool"]["limit"])).labels
    assert np.array_equal(labels, truth[ids]), "a label is stored on the wrong image"
    assert sorted(np.unique(res.labeled["round"]).tolist()) == [0, 1, 2]
    # the proxy learns: chance on Fashion-MNIST is 0.1 (this config measured 0.45-0.6 per round)
    assert res.rounds[-1]["proxy_test_accuracy"] > 0.3
    assert res.final_model is None  # final.training_method=none

    again = asvp_ray.run(raw, tmp_path / "run", overrides=SETS)
    assert again.already_finished and again.rounds == res.rounds
    assert np.array_equal(again.labeled["id"], ids)
    read = asvp_ray.result(tmp_path / "run")
    assert read.summary == again.summary
    # the same run through the CLI's config file: resume() reads the run's own config.yaml
    assert asvp_ray.resume(tmp_path / "run").already_finished


def test_api_errors_are_the_packages_own(tmp_path):
    with pytest.raises(RunDirError, match="holds no asvp-ray run"):
        asvp_ray.result(tmp_path / "nothing")
    with pytest.raises(RunDirError, match="no config.yaml"):
        asvp_ray.resume(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="Did you mean 'proxy.epochs'"):
        asvp_ray.as_config(str(SMOKE), ["proxy.epoch=3"])
    cfg = asvp_ray.as_config(str(SMOKE), SETS)
    assert asvp_ray.as_config(cfg).budget.schedule == [30, 20, 20]
    assert asvp_ray.as_config(cfg, ["seed=3"]).seed == 3 and cfg.seed != 3
