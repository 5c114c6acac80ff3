"""The autoscaler's node types, read where each way of running an autoscaler keeps them: the shipped
KubeRay manifest through Ray's own KubeRay conversion, the launcher config, a file named by
ASVP_AUTOSCALING_CONFIG. (The monitor-process source is exercised on a real fake-autoscaler cluster
in tests/test_autoscale.py and tests/test_rehearsal.py.)"""
from __future__ import annotations

import logging

import pytest

from asvp_ray.runtime import node_types as nt
from asvp_ray.runtime import placement, resources
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"


def _workers(types):
    return {t["name"]: t for t in types if not t["head"]}


def test_the_shipped_raycluster_as_the_kuberay_autoscaler_sees_it():
    types = nt.from_file(CLUSTER / "kuberay" / "raycluster.yaml")
    head = [t for t in types if t["head"]]
    assert len(head) == 1 and head[0]["resources"]["CPU"] == 0 and head[0]["labels"] == {placement.LABEL: "head"}
    w = _workers(types)
    assert set(w) == {"cpu", "gpu"}
    assert w["gpu"]["resources"]["GPU"] == 1 and w["gpu"]["labels"] == {placement.LABEL: "gpu"}
    assert "GPU" not in w["cpu"]["resources"] and w["cpu"]["labels"] == {placement.LABEL: "cpu"}
    assert w["cpu"]["resources"]["CPU"] == 8 and (w["cpu"]["min"], w["cpu"]["max"]) == (0, 4)
    assert (w["gpu"]["min"], w["gpu"]["max"]) == (0, 4)


def test_the_launcher_config_names_its_types_and_labels():
    w = _workers(nt.from_file(CLUSTER / "aws-gpu.yaml"))
    assert {t["labels"][placement.LABEL] for t in w.values()} == {"cpu", "gpu"}
    assert all(t["min"] == 0 and t["max"] > 0 for t in w.values())


def test_a_file_that_is_neither_is_refused_by_name(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("cluster_name: x\n")
    with pytest.raises(ValueError, match="c.yaml holds neither"):
        nt.from_file(bad)


@pytest.fixture
def fresh_caches():
    nt._cache.clear()
    placement._decided.clear()
    yield
    nt._cache.clear()
    placement._decided.clear()


def test_asvp_autoscaling_config_makes_a_local_instance_plan_for_the_cluster_it_names(
        ray_local, monkeypatch, fresh_caches, caplog):
    from asvp_ray.runtime.resources import cluster_capacity

    now, autoscaling = cluster_capacity()
    assert not autoscaling and not now.get("GPU")
    assert resources.largest_cpu_node() == 0  # no node types: nothing the autoscaler could add

    nt._cache.clear()
    placement._decided.clear()
    monkeypatch.setenv(nt.ENV, str(CLUSTER / "kuberay" / "raycluster.yaml"))
    with caplog.at_level(logging.INFO, logger="asvp_ray.runtime.node_types"):
        can, autoscaling = cluster_capacity()
    assert autoscaling
    # the head as it is declared (0 CPU) + 4 CPU nodes x 8 + 4 GPU nodes x 8 CPU / 1 GPU
    assert can["GPU"] == 4 and can["CPU"] == 64, can
    assert "autoscaler node types from ASVP_AUTOSCALING_CONFIG" in caplog.text
    assert resources.largest_cpu_node() == 8  # the CPU group's pods
    assert nt.node_types_source().startswith(nt.ENV)


def test_an_unreadable_autoscaling_config_is_a_warning_not_a_failure(ray_local, monkeypatch, fresh_caches, caplog,
                                                                     tmp_path):
    from asvp_ray.runtime.resources import cluster_capacity

    monkeypatch.setenv(nt.ENV, str(tmp_path / "missing.yaml"))
    with caplog.at_level(logging.WARNING, logger="asvp_ray.runtime.node_types"):
        _, autoscaling = cluster_capacity()
    assert not autoscaling
    assert "missing.yaml could not be read" in caplog.text
