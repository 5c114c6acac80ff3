"""Ray Tune studies: the YAML search-space parser, a study end to end through the CLI (features
extracted once, ASHA, results table, best config, curves), and the restore of an interrupted study."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from asvp_ray.config import load_config
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.tune import parse_space, run_study
from asvp_ray.tune.space import set_key
from tests.conftest import ROOT, SMOKE
from tests.reference import WEAK_BELOW, WEAK_MEAN, check_proxy_against_reference, final_model_accuracy

SPACE = ROOT / "examples" / "space.yaml"
CLI = [str(Path(sys.executable).parent / "asvp-ray")]
# Short runs; no final fine-tuning where the config has one (it has its own tests).
FAST = ["budget.schedule=[40,40,40]", "final.training_method=none"]


# ---------------------------------------------------------------------------------- the parser
def test_example_space_parses_into_a_tune_param_space():
    sp = parse_space(SPACE, base=load_config(str(SMOKE)))
    assert sp.keys == ["strategy", "proxy.hidden", "proxy.lr", "proxy.epochs"]
    assert sp.grid_size == 2
    ps = sp.param_space()
    assert ps["strategy"] == {"grid_search": ["margin", "entropy"]}
    assert sorted(ps["proxy.hidden"].categories) == [32, 128]
    assert (ps["proxy.lr"].lower, ps["proxy.lr"].upper) == (0.02, 0.3)
    assert sorted(ps["proxy.epochs"].categories) == [10, 20]


def test_nested_and_dotted_keys_are_the_same_and_plain_values_are_constants():
    a = parse_space({"proxy": {"lr": {"uniform": [0.01, 0.1]}, "normalize": "l2"}})
    b = parse_space({"proxy.lr": {"uniform": [0.01, 0.1]}, "proxy.normalize": "l2"})
    assert a.params == b.params and a.constants == b.constants == {"proxy.normalize": "l2"}
    raw = a.trial_raw({"proxy": {"epochs": 3}}, {"proxy.lr": 0.05})
    assert raw == {"proxy": {"epochs": 3, "normalize": "l2", "lr": 0.05}}


def test_randint_includes_its_upper_bound_and_schedules_are_values():
    sp = parse_space({"proxy.epochs": {"randint": [10, 40]}, "budget.schedule": {"choice": [[40, 40], [20, 20, 40]]}})
    assert sp.param_space()["proxy.epochs"].upper == 41  # Tune's bound is exclusive
    assert sp.params[1].args == ([40, 40], [20, 20, 40])


def test_feature_combinations_enumerate_data_and_backbone_keys():
    sp = parse_space({"strategy": {"grid": ["margin", "entropy"]}, "data.pool.limit": {"grid": [200, 300]},
                      "backbone.image_size": {"choice": [32, 48]}})
    combos, continuous = sp.feature_combinations()
    assert len(combos) == 4 and continuous == []
    assert {"data.pool.limit": 200, "backbone.image_size": 48} in combos


@pytest.mark.parametrize("spec, message", [
    ({"strategy": {"gird": ["margin"]}}, "unknown distribution 'gird'. Did you mean 'grid'?"),
    ({"proxy": {"lr": {"unifrom": [0.1, 0.2]}}}, "Did you mean 'uniform'?"),
    ({"stratgy": {"grid": ["margin"]}}, "unknown config key 'stratgy'. Did you mean 'strategy'?"),
    ({"proxy": {"lrr": {"uniform": [0.1, 0.2]}}}, "unknown config key 'proxy.lrr'. Did you mean 'proxy.lr'?"),
    ({"proxy.lr": {"loguniform": [0, 0.3]}}, "loguniform needs 0 < low < high"),
    ({"proxy.lr": {"uniform": [0.3, 0.1]}}, "needs low < high"),
    ({"proxy.lr": {"uniform": [0.1]}}, "uniform needs [low, high] numbers"),
    ({"proxy.epochs": {"randint": [1.5, 3]}}, "randint needs integer bounds"),
    ({"strategy": {"grid": []}}, "grid needs a non-empty list"),
    ({"strategy": {"choice": "margin"}}, "choice needs a non-empty list"),
    ({"strategy": {"grid": ["margin", "nope"]}}, "'strategy' = \"nope\": config key 'strategy': unknown strategy"),
    ({"proxy.epochs": {"choice": [10, -1]}}, "'proxy.epochs' = -1"),
    ({"strategy.name": {"grid": ["a"]}}, "'strategy' is a value, not a section"),
    ({"feature_cache": {"grid": ["/tmp/x"]}}, "cannot be searched"),
    ({"proxy.lr": {"uniform": [0.1, 0.2], "grid": [1]}}, "a distribution has exactly one key"),
    ({"proxy": {"lr": 0.1}}, "no key is searched"),
    ({"proxy": {"lr": {"grid": [0.1]}}, "proxy.lr": {"grid": [0.2]}}, "'proxy.lr' is given twice"),
    ({"proxy": {"grid": [{"lr": 0.1}]}, "proxy.lr": {"grid": [0.2]}}, "overlap"),
    (["strategy"], "the top level must map config keys"),
])
def test_bad_spaces_say_what_is_wrong_and_where(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_space(spec, origin="space.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("space.yaml")


def test_space_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: {grid: [margin\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_space(bad)


def test_study_settings_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="scheduler 'hyperband' is not one of fifo, asha"):
        run_study(SMOKE, SPACE, tmp_path / "s", scheduler="hyperband")
    with pytest.raises(ConfigError, match="needs a test set"):
        run_study(SMOKE, SPACE, tmp_path / "s", overrides=["data.test=null"])
    with pytest.raises(ConfigError, match="Did you mean 'proxy.epochs'"):
        run_study(SMOKE, SPACE, tmp_path / "s", overrides=["proxy.epoch=3"])
    # the trials' storage is checked once, before any trial (tests/test_storage.py runs a study on S3)
    with pytest.raises(ConfigError, match=r"'storage' \(s3://bucket/studies\?colour=red\): .*fix the URI"):
        run_study(SMOKE, SPACE, tmp_path / "s", overrides=["storage=s3://bucket/studies?colour=red"])
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------- a study
def _rows(out: Path):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def _tune_cli(out: Path, *extra: str) -> subprocess.Popen:
    args = ["tune", str(SMOKE), "--space", str(SPACE), "--out", str(out), "--scheduler", "asha",
            "--max-concurrent", "1", "--num-samples", "2", *extra] + [x for s in FAST for x in ("--set", s)]
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, TQDM_DISABLE="1"))


def _finished_trials(out: Path):
    done = []
    for p in (out / "runs").glob("*/summary.json"):
        try:
            if json.loads(p.read_text()).get("status") == "finished":
                done.append(p.parent.name)
        except (OSError, ValueError):  # being replaced right now
            pass
    return done


@pytest.mark.slow
@pytest.mark.long
def test_study_end_to_end_interrupted_and_resumed(tmp_path):
    """`asvp-ray tune` as a user runs it: Ctrl+C after the first trial, then the same command again."""
    out = tmp_path / "study"
    first = _tune_cli(out)
    deadline = time.monotonic() + 600
    # Interrupt once the first trial has finished and the second has started.
    while first.poll() is None and time.monotonic() < deadline and not (
            _finished_trials(out) and len(list((out / "runs").glob("*/summary.json"))) >= 2):
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves the study's state and stops its trials
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 130, (stdout[-2000:], stderr[-4000:])
    assert "study interrupted; rerun the same command to resume it" in stderr
    before = {t: (out / "runs" / t / "run.log").read_text() for t in _finished_trials(out)}
    assert 1 <= len(before) < 4
    assert any(row["status"] == "unfinished" for row in _rows(out))

    second = _tune_cli(out)
    stdout, stderr = second.communicate(timeout=900)
    assert second.returncode == 0, stderr[-4000:]
    rows = _rows(out)
    assert len(rows) == 4  # 2 samples of the 2-value grid
    assert all(row["trial"] in stdout for row in rows)  # the printed table
    assert sorted(row["strategy"] for row in rows) == ["entropy", "entropy", "margin", "margin"]
    assert all(row["proxy.hidden"] in ("32", "128") for row in rows)
    assert {row["status"] for row in rows} <= {"finished", "stopped"}
    finished = [row for row in rows if row["status"] == "finished"]
    assert all(row["rounds"] == "3" and row["n_labeled"] == "120" for row in finished)
    assert all(0 < int(row["rounds"]) < 3 for row in rows if row["status"] == "stopped")  # by ASHA
    # every trial's proxy learns what its labels teach: each round near the independent reference
    # (tests/reference.py), with the margin the space's weakest corner (hidden 32, lr 0.02, 10 epochs)
    # needs; the table's accuracy is the last round's
    for row in rows:
        got = [r["proxy_test_accuracy"] for r in json.loads((Path(row["run_dir"]) / "summary.json").read_text())["rounds"]]
        check_proxy_against_reference(Path(row["run_dir"]), got, below=WEAK_BELOW, mean=WEAK_MEAN)
        assert float(row["proxy_test_accuracy"]) == pytest.approx(got[-1])
    assert rows[0]["status"] == "finished"  # best first
    assert float(rows[0]["proxy_test_accuracy"]) == max(float(x["proxy_test_accuracy"]) for x in finished)

    for row in rows:
        run = Path(row["run_dir"])
        log = (run / "run.log").read_text()
        # The resumed study kept the finished trials and resumed the others: every round ran once.
        for k in range(int(row["rounds"])):
            assert log.count(f"round {k}: +40 labels") == 1, (row["trial"], log)
        if row["trial"] in before:
            assert log == before[row["trial"]]
        # Tune saw the trial's learning curve, one report per round.
        results = [json.loads(x) for x in (out / "tune" / row["trial"] / "result.json").read_text().splitlines()]
        assert [x["round"] for x in results][-int(row["rounds"]):] == list(range(int(row["rounds"])))
        assert all("proxy_test_accuracy" in x and "n_labeled" in x for x in results)

    # Features were extracted once, before the trials, and every trial hard-links them.
    keys = [p for p in (out / "feature_cache").iterdir() if p.is_dir()]
    assert len(keys) == 1
    cached = keys[0] / "v0" / "part-00000.parquet"
    for row in rows:
        run = Path(row["run_dir"])
        assert (run / "features" / "v0" / "part-00000.parquet").stat().st_ino == cached.stat().st_ino
        assert "extracting feature version" not in (run / "run.log").read_text()
    meta = json.loads((keys[0] / "v0" / "meta.json").read_text())
    assert Path(meta["run"]).parent == out / "prefetch"

    # The best config runs unchanged with `asvp-ray run`: it loads, and it is the best trial's.
    best = load_config(str(out / "best_config.yaml"))
    assert best.strategy == rows[0]["strategy"] and best.proxy.hidden == int(rows[0]["proxy.hidden"])
    assert abs(best.proxy.lr - float(rows[0]["proxy.lr"])) < 1e-9
    assert best.feature_cache == str(out / "feature_cache")
    assert (out / "curves.png").stat().st_size > 10_000


def test_a_study_directory_resumes_only_the_same_study(tmp_path):
    from asvp_ray.tune.study import _check_study

    base = load_config(str(SMOKE)).model_dump(mode="json")
    base.pop("feature_cache")
    space = {"strategy": {"grid": ["margin", "entropy"]}}
    _check_study(tmp_path, {"config": base, "space": parse_space(space).to_yaml_dict()})
    with pytest.raises(RunDirError, match="different search space"):
        run_study(SMOKE, {"strategy": {"grid": ["margin"]}}, tmp_path)
    with pytest.raises(RunDirError, match=r"different config \(differs in: seed\)"):
        run_study(SMOKE, space, tmp_path, overrides=["seed=1"])


def test_set_key_creates_sections_without_touching_the_input():
    base = {"proxy": {"lr": 0.1}}
    out = set_key(base, "proxy.hidden", 64)
    assert out == {"proxy": {"lr": 0.1, "hidden": 64}} and base == {"proxy": {"lr": 0.1}}
    assert yaml.safe_load(yaml.safe_dump(set_key({}, "a.b.c", [1, 2]))) == {"a": {"b": {"c": [1, 2]}}}


def test_round_metrics_reported_to_tune_are_numbers_with_the_final_accuracy_on_the_last_round():
    from asvp_ray.tune.study import _metrics

    rec = {"round": 2, "n_labeled": 120, "selected_by": "margin", "refreshed": False, "proxy_test_accuracy": 0.31,
           "proxy_train_accuracy": None, "seconds": {"select": 0.1, "label": 0.0}, "alignment": {"logme": -0.5}}
    m = _metrics(rec, {"test_accuracy": 0.62, "training_method": "ft"})
    assert m == {"round": 2, "n_labeled": 120, "refreshed": 0, "proxy_test_accuracy": 0.31, "seconds/select": 0.1,
                 "seconds/label": 0.0, "alignment/logme": -0.5, "final_test_accuracy": 0.62}
    assert "final_test_accuracy" not in _metrics(rec, None)


class _FakeResult:
    def __init__(self, path, config, error=None):
        self.path, self.config, self.error = str(path), config, error


def _fake_run(out: Path, trial: str, accs, final=None, status="finished", schedule=(40, 40, 40)):
    run = out / "runs" / trial
    run.mkdir(parents=True)
    rounds = [{"round": i, "n_labeled": 40 * (i + 1), "proxy_test_accuracy": a} for i, a in enumerate(accs)]
    summary = {"status": status, "schedule": list(schedule), "rounds": rounds}
    if final is not None:
        summary["final"] = {"test_accuracy": final}
    (run / "summary.json").write_text(json.dumps(summary))


def test_results_rank_finished_trials_by_final_accuracy_and_write_table_best_config_and_curves(tmp_path):
    from asvp_ray.tune.study import write_results

    sp = parse_space({"strategy": {"grid": ["margin", "entropy", "least_confidence"]}})
    base = load_config(str(SMOKE)).model_dump(mode="json")
    _fake_run(tmp_path, "t1", [0.2, 0.3, 0.5], final=0.60)   # best last proxy accuracy, worse final model
    _fake_run(tmp_path, "t2", [0.2, 0.3, 0.4], final=0.70)   # the best final model
    _fake_run(tmp_path, "t3", [0.2], status="running")        # stopped by ASHA after one round
    grid = [_FakeResult(tmp_path / "tune" / t, {"strategy": s})
            for t, s in (("t1", "margin"), ("t2", "entropy"), ("t3", "least_confidence"))]
    res = write_results(tmp_path, grid, sp, base)
    assert [r["trial"] for r in res.rows] == ["t2", "t1", "t3"]
    assert [r["status"] for r in res.rows] == ["finished", "finished", "stopped"]
    assert res.best["trial"] == "t2" and not res.interrupted
    assert "final_test_accuracy" in res.table.splitlines()[0]
    assert _rows(tmp_path)[0]["final_test_accuracy"] == "0.7"
    best = load_config(str(res.best_config))
    assert best.strategy == "entropy" and best.feature_cache == str(tmp_path / "feature_cache")
    assert "ranked by final test accuracy" in res.best_config.read_text().splitlines()[0]
    assert res.curves_png.stat().st_size > 10_000


def test_cli_tune_refuses_a_bad_space_before_starting_anything(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("strategy: {gird: [margin, entropy]}\n")
    out = tmp_path / "study"
    r = subprocess.run(CLI + ["tune", str(SMOKE), "--space", str(space), "--out", str(out)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert "unknown distribution 'gird'. Did you mean 'grid'?" in r.stderr
    assert not out.exists()
    r = subprocess.run(CLI + ["tune", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "--space" in r.stdout and "--scheduler" in r.stdout


# ---------------------------------------------------------------------------------- resources
README_TUNE = "asvp-ray tune examples/smoke.yaml --space examples/space.yaml --out runs/study"


def _cli(args, timeout):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, TQDM_DISABLE="1"))


def _check_study_outputs(out: Path, n_trials: int, tmp_path: Path, rerun_best: bool = True):
    """results.csv, best_config.yaml and curves.{png,json} agree with the trials' summary.json, and (with
    ``rerun_best``) the best config reruns unchanged with `asvp-ray run`."""
    rows = _rows(out)
    assert len(rows) == n_trials and all(r["status"] == "finished" for r in rows), rows
    curves = json.loads((out / "curves.json").read_text())["axes"][0]
    assert curves["y_offset_text"] == "" and curves["x_offset_text"] == ""
    series = {s["label"]: s for s in curves["series"]}
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        final = summary["final"]["test_accuracy"]
        # the recorded accuracy is the kept model's: its model file, scored here on the test images
        # (up to 2 of 200 images may flip between the workers' batched eval and this one, as in
        # tests/test_finetune.py); a constant, the proxy's or the training accuracy would not match
        assert final == pytest.approx(final_model_accuracy(Path(row["run_dir"])), abs=0.011)
        assert float(row["final_test_accuracy"]) == pytest.approx(final)
        proxy = next(s for name, s in series.items() if name.startswith(row["trial"]) and name.endswith("(proxy)"))
        assert proxy["y"] == pytest.approx([r["proxy_test_accuracy"] for r in summary["rounds"]])
        star = series[f"{row['trial']} final model"]
        assert star["y"] == pytest.approx([final]) and star["x"] == [summary["rounds"][-1]["n_labeled"]]
    best = out / "best_config.yaml"
    assert load_config(str(best)).strategy == rows[0]["strategy"]
    if not rerun_best:
        return rows
    r = _cli(["run", str(best), "--out", str(tmp_path / "best")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rerun = json.loads((tmp_path / "best" / "summary.json").read_text())
    assert rerun["status"] == "finished" and rerun["final"]["test_accuracy"] is not None
    assert rerun["strategy"] == rows[0]["strategy"]
    return rows


@pytest.mark.slow
@pytest.mark.long
def test_readme_tune_command_finishes_with_default_concurrency_and_final_models(tmp_path):
    """The docs' command (README and docs/studies.md), unchanged but for --out: every trial trains a final model (Ray Train)
    and the study admits only as many trials as fit with their workers, so none waits forever."""
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "studies.md").read_text()
    assert README_TUNE in readme and README_TUNE in SPACE.read_text()
    args = README_TUNE.split()[1:]
    args[args.index("runs/study")] = str(tmp_path / "study")
    r = _cli(args, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    # On this 2-CPU machine: 0.5 CPU per trial + 1 CPU for its Ray Train worker -> one trial at a time.
    assert "each trial needs at most 1.5 CPU" in r.stderr and "1 trial(s) at once" in r.stderr
    rows = _check_study_outputs(tmp_path / "study", 2, tmp_path)
    assert {row["strategy"] for row in rows} == {"margin", "entropy"}


@pytest.mark.slow
@pytest.mark.long
def test_asvp_every_round_study_refreshes_inside_its_trials_and_finishes(tmp_path):
    """Trials that fine-tune and re-extract the pool (Ray Train, then a Ray Data actor pool sized to
    the trial's share) and train a final model."""
    space = tmp_path / "space.yaml"
    space.write_text("method: asvp\nrefresh.policy: every_round\nstrategy: {grid: [margin]}\n")
    out = tmp_path / "study"
    r = _cli(["tune", str(SMOKE), "--space", str(space), "--out", str(out), "--set", "budget.schedule=[40]"],
             timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "each trial needs at most 2 CPU" in r.stderr, r.stderr[-3000:]
    # the README test reruns a best config with `asvp-ray run`; this one checks that it loads
    rows = _check_study_outputs(out, 1, tmp_path, rerun_best=False)
    summary = json.loads((Path(rows[0]["run_dir"]) / "summary.json").read_text())
    assert summary["rounds"][0]["refreshed"] and summary["rounds"][0]["feature_version"] == 1
    log = (Path(rows[0]["run_dir"]) / "run.log").read_text()
    assert "extracting feature version v1" in log
    assert "actor(s) x {CPU: 0.5, GPU: 0}" in log  # the actor pool sized to the trial's share (1.5 CPU), not to the machine


def test_a_study_that_cannot_fit_one_trial_says_so_before_it_starts(tmp_path, ray_local):
    out = tmp_path / "study"
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        run_study(SMOKE, SPACE, out, overrides=["train.num_workers=2"])
    msg = str(e.value)
    assert msg.startswith("one trial needs 2.5 CPU but the cluster has 2 CPU and no autoscaler to add more")
    assert "train.num_workers=2 x train.cpus_per_worker=1" in msg
    assert "final.training_method=auto trains a final model" in msg
    assert "Shrink it with train.num_workers, train.cpus_per_worker, final.training_method=none" in msg
    assert "--cpus-per-trial" in msg
    assert time.monotonic() - t0 < 30 and not out.exists()
    # a trial's extraction on its 1-CPU share: an actor of 0 CPU beside a 1-CPU read task (half a CPU
    # each made 1.5 CPU, which never started); the fine-tune's 2 workers are what cannot fit
    with pytest.raises(ConfigError, match=r"one trial needs 3 CPU .* or extraction 1 \(1 extraction actor\(s\) x 0 CPU .*Shrink it with "
                       r"train.num_workers, train.cpus_per_worker, extract.num_actors .*refresh.policy=never"):
        run_study(SMOKE, {"method": "asvp", "refresh.policy": "every_round", "strategy": {"grid": ["margin"]}},
                  out, overrides=["final.training_method=none", "train.num_workers=2"], cpus_per_trial=1.0)


def test_study_concurrency_counts_each_trials_nested_work():
    from asvp_ray.tune.resources import plan_study

    cfg = load_config(str(SMOKE))
    head = {"CPU": 0.5, "GPU": 0.0}
    # svpp with a final model: 0.5 + 1 Ray Train CPU per trial.
    assert plan_study([cfg], 4, head=head, prefetched=True, capacity={"CPU": 2, "GPU": 0}).max_concurrent == 1
    assert plan_study([cfg], 4, head=head, prefetched=True, capacity={"CPU": 6, "GPU": 0}).max_concurrent == 4
    assert plan_study([cfg], 4, head=head, prefetched=True, capacity={"CPU": 6, "GPU": 0},
                      max_concurrent=2).max_concurrent == 2
    # GPU workers: the GPUs limit it.
    assert plan_study([cfg], 4, head=head, prefetched=True, capacity={"CPU": 16, "GPU": 2}).max_concurrent == 2
    # Without a final model nor refreshes a trial is its actor alone.
    bare = load_config(str(SMOKE), ["final.training_method=none"])
    assert plan_study([bare], 8, head=head, prefetched=True, capacity={"CPU": 2, "GPU": 0}).max_concurrent == 4
    # Refreshing trials: the extraction pool is sized to the trial's share and counted.
    asvp = load_config(str(SMOKE), ["method=asvp", "refresh.policy=every_round"])
    p = plan_study([asvp], 4, head=head, prefetched=True, capacity={"CPU": 8, "GPU": 0})
    assert p.max_concurrent == 4 and p.extract_budget == {"CPU": 1.5, "GPU": 0.0}
    assert p.need.peak == {"CPU": 2.0, "GPU": 0.0}


def test_nested_work_that_could_never_start_inside_a_task_holding_cpus_says_why(ray_local):
    """`asvp-ray run` inside a Ray task or actor (or a Tune trial's placement group) that holds CPUs:
    a Ray Train worker group or extraction pool that could only start with those CPUs is refused."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from asvp_ray.runtime.resources import check_nested

    def probe(n):
        try:
            check_nested({"CPU": n, "GPU": 0.0}, "the Ray Train workers", "train.num_workers", grace_s=0)
            return "ok"
        except ConfigError as e:
            return str(e)

    task = ray.remote(num_cpus=1.5)(probe)
    assert ray.get(task.remote(0.5)) == "ok"
    assert ray.get(task.remote(1.0)).startswith(
        "the Ray Train workers need 1 CPU but the cluster has 2 CPU and this Ray task/actor holds 1.5 of them")
    pg = placement_group([{"CPU": 1.5}])
    ray.get(pg.ready())
    try:
        in_pg = ray.remote(num_cpus=1.5)(probe).options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg))
        assert "holds 1.5 of them" in ray.get(in_pg.remote(1.0))
    finally:
        remove_placement_group(pg)
    assert probe(2.0) == "ok"  # a driver process holds nothing: it may wait, never refused
