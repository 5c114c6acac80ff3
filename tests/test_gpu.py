"""GPU readiness (issue 19).

Two parts:

- CPU-checkable logic, run everywhere: the precision choice as a function of the compute
  capability, the amp/device config keys, a pickled proxy holding only CPU tensors and scoring
  on the receiver's device, device and precision in meta.json and the feature-cache key, the
  device-dependent training defaults, faiss GPU options refused without a GPU build, and the
  device-side preprocessing (on the CPU device it must equal the host preprocessing exactly).
- Tests marked ``gpu``: they need CUDA and skip with the reason elsewhere (tests/conftest.py).
  Run them on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""
from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asvp_ray.config import ExtractConfig, load_config
from asvp_ray.runtime.device import DevicePreprocessor, choose_precision, faiss_gpu_available, normalize_amp
from asvp_ray.core.errors import ConfigError, RunDirError
from asvp_ray.features.backbones import BackboneSpec, Preprocessor, create_backbone, data_config
from asvp_ray.proxy.mlp import MLPProxy
from asvp_ray.train.config import TrainConfig
from tests.conftest import SMOKE

SPEC = BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0)
LITE0 = BackboneSpec("tf_efficientnet_lite0", weights="auto", image_size=32, crop_pct=1.0)


def _blobs(n=600, d=24, c=4, seed=0):
    r = np.random.default_rng(seed)
    centers = r.normal(0, 3, (c, d))
    y = r.integers(0, c, n)
    return (centers[y] + r.normal(0, 1, (n, d))).astype(np.float32), y


def _tensors(obj):
    """Every torch tensor reachable from a pickled state (dicts, tuples, modules)."""
    out = []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, dict):
        for v in obj.values():
            out += _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _tensors(v)
    return out


# =========================================================================== precision
@pytest.mark.parametrize("amp, device, cap, want", [
    ("auto", "cuda", (8, 0), "bf16"),    # A100
    ("auto", "cuda", (9, 0), "bf16"),    # H100
    ("auto", "cuda", (8, 6), "bf16"),    # A10 / RTX 30xx
    ("auto", "cuda", (7, 5), "fp16"),    # T4: bf16 would be emulated
    ("auto", "cuda", (7, 0), "fp16"),    # V100
    ("fp16", "cuda", (9, 0), "fp16"),
    ("bf16", "cuda", (8, 9), "bf16"),
    ("off", "cuda", (9, 0), "fp32"),
    ("auto", "cpu", None, "fp32"),       # CPU results never change with amp
    ("bf16", "cpu", None, "fp32"),
    ("fp16", "cpu", None, "fp32"),
    (True, "cuda", (7, 5), "fp16"),      # a boolean of an older config means auto
    (False, "cuda", (9, 0), "fp32"),
])
def test_precision_follows_the_compute_capability(amp, device, cap, want):
    assert choose_precision(amp, device, cap) == want


def test_bf16_on_a_pre_ampere_card_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"train.amp: bf16 needs a GPU of compute capability 8.0 or higher.*"
                                          r"Tesla T4 has 7.5.*set train.amp: fp16 or auto"):
        choose_precision("bf16", "cuda", (7, 5), "Tesla T4", key="train.amp")
    with pytest.raises(ConfigError, match="extract.amp='fp8' is not one of auto, off, bf16, fp16"):
        normalize_amp("fp8", "extract.amp")


def test_amp_and_device_config_keys():
    cfg = load_config(str(SMOKE), ["extract.amp=fp16", "train.amp=bf16", "proxy.device=auto"])
    assert (cfg.extract.amp, cfg.train.amp, cfg.proxy.device) == ("fp16", "bf16", "auto")
    old = load_config(str(SMOKE), ["extract.amp=true", "train.amp=false"])  # configs written before
    assert (old.extract.amp, old.train.amp) == ("auto", "off")
    assert ExtractConfig().amp == "auto" and TrainConfig().amp == "auto"
    with pytest.raises(ConfigError, match="config key 'train.amp'.*'auto', 'off', 'bf16' or 'fp16'"):
        load_config(str(SMOKE), ["train.amp=bf32"])
    # The proxy is fitted in the run's driver, which reserves no GPU: cuda is refused at load.
    with pytest.raises(ConfigError, match="proxy.device: cuda cannot work.*reserves no GPU.*set proxy.device: auto"):
        load_config(str(SMOKE), ["proxy.device=cuda"])


# =========================================================================== the proxy crossing processes
def test_pickled_proxy_holds_only_cpu_tensors_and_scores_where_it_lands(ray_local, caplog):
    X, y = _blobs()
    proxy = MLPProxy(epochs=5, batch_size=128, device="auto", seed=3).fit(X, y)
    want = proxy.predict_proba(X)
    state = proxy.__getstate__()
    assert "device_" not in state and state["fitted_device_"] == str(proxy.device_)
    tensors = _tensors(state)
    assert len(tensors) >= 8 and all(t.device.type == "cpu" for t in tensors)
    assert not any(isinstance(v, torch.device) for v in state.values())
    assert proxy.device_ == torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the original kept it

    # A proxy configured for CUDA (as one fitted in a GPU Tune trial is) lands in a process
    # without CUDA: it scores on the CPU there, with a warning, instead of failing to unpickle.
    proxy.device = "cuda"
    blob = pickle.dumps(proxy)
    proxy.device = "auto"
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="asvp_ray.proxy.mlp"):
            clone = pickle.loads(blob)
            got = clone.predict_proba(X)
        assert clone.device_ == torch.device("cpu")
        np.testing.assert_array_equal(got, want)
        assert "scores on the CPU in this process" in caplog.text

    # ... and in a Ray task (another process), which is what shard actors do.
    import ray

    @ray.remote(num_cpus=1)
    def score(p, X):
        return p.predict_proba(X), str(p.device_), [str(t.device) for t in p._scoring_params_ if t is not None]

    got, dev, where = ray.get(score.remote(pickle.loads(blob), X))
    assert dev == "cpu" and set(where) == {"cpu"}  # a task that reserved no GPU never computes on one
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    # set_params(device=...) after fitting moves the scoring to that device on the next use.
    clone = pickle.loads(pickle.dumps(proxy)).set_params(device="cpu")
    np.testing.assert_allclose(clone.predict_proba(X), want, rtol=1e-5, atol=1e-6)
    assert clone.device_ == torch.device("cpu")


def test_checkpoint_optimizer_state_is_copied_to_cpu():
    from asvp_ray.train.finetune import _to_cpu

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = torch.nn.Linear(3, 2).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(4, 3, device=dev)).sum().backward()
    opt.step()
    state = opt.state_dict()
    moved = _to_cpu(state)
    assert moved["param_groups"] == state["param_groups"] and set(moved["state"]) == {0, 1}
    buf, orig = moved["state"][0]["momentum_buffer"], state["state"][0]["momentum_buffer"]
    assert buf.device.type == "cpu" and buf.data_ptr() != orig.data_ptr()  # a copy: training goes on
    torch.testing.assert_close(buf, orig.cpu())


# =========================================================================== features: meta.json and cache key
def test_extraction_records_device_and_precision(ray_local, tmp_path):
    from asvp_ray.data.fashion_mnist import FashionMNISTSource
    from asvp_ray.features.extract import extract_to_store
    from asvp_ray.features.store import FeatureStore

    store = FeatureStore(tmp_path / "f")
    meta = extract_to_store(store, 0, FashionMNISTSource(split="train", limit=64), SPEC,
                            ExtractConfig(batch_size=32, device="cpu", amp="bf16", progress=False))
    on_disk = json.loads((tmp_path / "f" / "v0" / "meta.json").read_text())
    assert meta["device"] == on_disk["device"] == "cpu"
    assert on_disk["precision"] == "fp32" and on_disk["amp"] == "bf16" and on_disk["gpu"] is None


def test_feature_cache_key_names_device_and_precision(tmp_path):
    import hashlib

    from asvp_ray.features.cache import cache_key, check_cached_compute, legacy_cache_entries

    inputs = {"backbone": {"name": "x"}, "weights_hash": "ab", "pool": {"kind": "fashion_mnist"}}
    keys = {(d, p): cache_key(inputs, device=d, precision=p)
            for d, p in [("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")]}
    assert len(set(keys.values())) == 4
    assert keys[("cpu", "fp32")] == cache_key(dict(inputs), device="cpu", precision="fp32")  # stable
    legacy = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]  # the old formula
    assert legacy not in keys.values()

    # An entry made before device and precision were in the key is found, and never reused.
    (tmp_path / legacy / "v0").mkdir(parents=True)
    (tmp_path / legacy / "v0" / "meta.json").write_text(json.dumps({"backbone": "x", "rows": 3}))
    (tmp_path / keys[("cpu", "fp32")] / "v0").mkdir(parents=True)
    (tmp_path / keys[("cpu", "fp32")] / "v0" / "meta.json").write_text(json.dumps({"device": "cpu", "precision": "fp32"}))
    assert [p.name for p in legacy_cache_entries(tmp_path)] == [legacy]
    # An entry whose meta.json contradicts its key is refused, not mixed in.
    check_cached_compute({"device": "cpu", "precision": "fp32"}, "cpu", "fp32", tmp_path)
    with pytest.raises(RunDirError, match="computed on cuda in bf16, but its key is for cpu in fp32; delete"):
        check_cached_compute({"device": "cuda", "precision": "bf16"}, "cpu", "fp32", tmp_path / "e")
    with pytest.raises(RunDirError, match="an unrecorded device in an unrecorded precision"):
        check_cached_compute({}, "cpu", "fp32", tmp_path / "e")


# =========================================================================== training defaults
def test_training_defaults_depend_on_the_device():
    gpu_nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8, "GPU": 1}, {"CPU": 4}]
    plan = TrainConfig(num_workers=2).plan({"CPU": 28, "GPU": 3}, gpu_nodes)
    assert plan.use_gpu and plan.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}
    assert plan.loader_workers == 3 and plan.torch_threads == 4  # every reserved CPU but the loop's
    thin = TrainConfig(num_workers=1).plan({"CPU": 12, "GPU": 4}, [{"CPU": 8, "GPU": 4}, {"CPU": 4}])
    assert thin.resources_per_worker["CPU"] == 2.0 and thin.loader_workers == 1  # 2 CPUs per GPU there
    assert TrainConfig(augment=False).plan({"CPU": 8, "GPU": 1}, [{"CPU": 8, "GPU": 1}]).loader_workers == 0
    mine = TrainConfig(cpus_per_worker=6, loader_workers=2).plan({"CPU": 8, "GPU": 1}, [{"CPU": 8, "GPU": 1}])
    assert mine.resources_per_worker["CPU"] == 6.0 and mine.loader_workers == 2  # explicit values win
    cpu = TrainConfig(num_workers=2).plan({"CPU": 2}, [{"CPU": 2}])  # CPU workers: as before
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.0} and cpu.loader_workers == 0
    small = TrainConfig(num_workers=1).plan({"CPU": 2, "GPU": 1})  # a small GPU box: share what there is
    assert small.resources_per_worker == {"CPU": 2.0, "GPU": 1.0} and small.loader_workers == 1


def test_fp16_loss_scaled_step_trains():
    """The GradScaler branch of the training step (fp16 on CUDA), exercised with a CPU scaler."""
    from asvp_ray.train.finetune import _train_epoch

    torch.manual_seed(0)
    X, y = _blobs(256, 8, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y)),
                                         batch_size=32, shuffle=True)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = []
    for _ in range(3):
        s = _train_epoch(net, loader, opt, torch.device("cpu"), "fp16", scaler=scaler)
        losses.append(float(s["loss_sum"] / s["seen"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert scaler.get_scale() > 0 and int(s["seen"]) == 256


# =========================================================================== preprocessing on the device
@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba", "mixed_sizes", "tensor"])
def test_device_preprocessing_equals_host_preprocessing_on_cpu(kind):
    spec = BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=0.875)
    pre = Preprocessor(data_config(spec, create_backbone(spec)))
    r = np.random.default_rng(1)
    images = {
        "gray": r.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "rgb": r.integers(0, 256, (4, 20, 24, 3), dtype=np.uint8),
        "rgba": r.integers(0, 256, (3, 40, 36, 4), dtype=np.uint8),
        "tensor": r.integers(0, 256, (4, 28, 28), dtype=np.uint8),
    }
    if kind == "mixed_sizes":
        imgs = np.empty(3, dtype=object)
        imgs[:] = [r.integers(0, 256, s, dtype=np.uint8) for s in [(28, 28), (30, 22, 3), (50, 60, 3)]]
    else:
        imgs = images[kind]
    want = pre(imgs)
    dev = DevicePreprocessor(pre, "cpu")
    got = dev(torch.from_numpy(imgs)) if kind == "tensor" else dev(imgs)
    assert got.shape == want.shape == (len(imgs), 3, 32, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert DevicePreprocessor(pre, "cpu", channels_last=True)(images["rgb"]).is_contiguous(
        memory_format=torch.channels_last)


# =========================================================================== faiss on GPUs
def test_faiss_gpu_options_need_a_gpu_build():
    ok, why = faiss_gpu_available()
    if ok:
        pytest.skip(f"a GPU build of faiss is installed here ({why})")
    from asvp_ray.pool.view import PoolView
    from asvp_ray.selection import STRATEGIES
    from asvp_ray.selection.typiclust import kmeans_labels

    X, _ = _blobs(300, 8, 3)
    with pytest.raises(ConfigError, match="k-means: use_gpu=True but .*install a GPU build of faiss"):
        kmeans_labels(X, 3, 0, backend="sklearn", use_gpu=True)  # would have run on the CPU silently
    pool = PoolView(ids=np.arange(300, dtype=np.int64), features=X, labeled_mask=np.zeros(300, bool))
    for name in ("typiclust", "probcover"):
        with pytest.raises(ConfigError, match=f"{name}: use_gpu=True but .*set use_gpu=False"):
            STRATEGIES.create(name, use_gpu=True).select(pool, 5, np.random.default_rng(0))


def _fake_gpu_faiss(monkeypatch):
    """A stand-in for a GPU build of faiss that sees one GPU, as faiss does in any process on a
    GPU node (it counts the devices it can see, not the ones Ray reserved)."""
    import types

    fake = types.ModuleType("faiss")
    fake.StandardGpuResources = object
    fake.get_num_gpus = lambda: 1
    monkeypatch.setitem(sys.modules, "faiss", fake)


def test_gpu_reservation_rule_refuses_a_ray_worker_that_reserved_none():
    from asvp_ray.runtime.device import RESERVE_GPU_FIX, UNRESERVED_GPU, unreserved_gpu_reason

    assert unreserved_gpu_reason(None) == ""  # the driver, or no Ray: nothing to honour
    assert unreserved_gpu_reason(["0"]) == "" and unreserved_gpu_reason([3, 4]) == ""
    assert unreserved_gpu_reason([]) == UNRESERVED_GPU
    assert "reserved no GPU" in UNRESERVED_GPU and "num_gpus=1" in RESERVE_GPU_FIX


def test_faiss_gpu_path_follows_rays_reservation(monkeypatch):
    from asvp_ray.runtime.device import _faiss_gpu_check, faiss_gpu_available

    _fake_gpu_faiss(monkeypatch)
    assert _faiss_gpu_check(None)[0] and _faiss_gpu_check(["0"])[0]
    ok, why, fix = _faiss_gpu_check([])
    assert not ok and "reserved no GPU" in why and "num_gpus=1" in fix
    assert faiss_gpu_available() == (True, "faiss sees 1 GPU(s)")  # this test process is no Ray worker


def test_faiss_gpu_refused_in_a_ray_task_that_reserved_no_gpu(ray_local):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a task of num_gpus=0, so faiss would see
    (and take) the node's GPUs: the check reads the task's reservation instead."""
    from asvp_ray.runtime.device import ray_gpu_reservation

    # defined here, so that Ray ships it by value to a worker that cannot import this test file
    def _faiss_check_in_a_worker():
        import types

        fake = types.ModuleType("faiss")
        fake.StandardGpuResources = object
        fake.get_num_gpus = lambda: 1
        real = sys.modules.get("faiss")
        sys.modules["faiss"] = fake
        try:
            from asvp_ray.runtime.device import faiss_gpu_available, ray_gpu_reservation, require_faiss_gpu

            try:
                require_faiss_gpu("typiclust")
                raised = ""
            except ConfigError as e:
                raised = str(e)
            return ray_gpu_reservation(), faiss_gpu_available(), raised
        finally:
            if real is None:
                del sys.modules["faiss"]
            else:
                sys.modules["faiss"] = real

    assert ray_gpu_reservation() is None  # the driver
    reserved, (ok, why), raised = ray_local.get(ray_local.remote(_faiss_check_in_a_worker)
                                                .options(num_cpus=0, num_gpus=0).remote())
    assert reserved == [] and not ok and "reserved no GPU" in why
    assert raised.startswith("typiclust: use_gpu=True but this Ray task or actor reserved no GPU")
    assert "num_gpus=1" in raised and "set use_gpu=False" in raised


# =========================================================================== TF32
@pytest.fixture
def tf32_restored():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32 = saved[1]
    torch.backends.cudnn.allow_tf32 = saved[2]


def test_recorded_fp32_on_cuda_turns_tf32_off(tf32_restored):
    from asvp_ray.runtime.device import match_tf32, tf32_flags

    assert tf32_flags("fp32", "cpu") is None and tf32_flags("bf16", "cuda") is None
    assert tf32_flags("fp16", "cuda") is None
    torch.set_float32_matmul_precision("high")  # TF32 on, as a user or a library may leave it
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
    assert match_tf32("bf16", "cuda") is None and match_tf32("fp32", "cpu") is None
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    assert match_tf32("fp32", "cuda") == {"float32_matmul_precision": "highest", "cudnn_allow_tf32": False}
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


# =========================================================================== on a GPU
def _fm(n):
    from asvp_ray.data.fashion_mnist import FashionMNISTSource

    return FashionMNISTSource(split="train", limit=n)


def _expected_precision(amp="auto"):
    cap = torch.cuda.get_device_capability()
    return choose_precision(amp, "cuda", cap)


@pytest.mark.gpu
def test_cuda_extraction_equals_cpu_features_within_amp_tolerance(ray_local, tmp_path):
    from asvp_ray.features.extract import extract_to_store
    from asvp_ray.features.store import FeatureStore

    src = _fm(256)
    store = FeatureStore(tmp_path / "f")
    base = dict(batch_size=64, progress=False)
    m_cpu = extract_to_store(store, 0, src, LITE0, ExtractConfig(device="cpu", **base))
    m_gpu = extract_to_store(store, 1, src, LITE0, ExtractConfig(device="cuda", amp="auto", **base))
    m_off = extract_to_store(store, 2, src, LITE0, ExtractConfig(device="cuda", amp="off", **base))
    assert (m_cpu["device"], m_cpu["precision"]) == ("cpu", "fp32")
    assert (m_gpu["device"], m_gpu["precision"]) == ("cuda", _expected_precision())
    assert m_gpu["capability"] == list(torch.cuda.get_device_capability())
    assert m_off["precision"] == "fp32"
    ids, f_cpu = store.read(0)
    # Tolerances from the same comparison with CPU autocast (Lite0, 32 px, 256 images): bf16
    # relative error median 0.064 / max 0.16, fp16 0.0074 / 0.018; a wrongly normalised input
    # gives a median of 0.74. Every image must also be nearest to its own CPU features.
    tol = {"bf16": (0.12, 0.3), "fp16": (0.02, 0.05), "fp32": (0.005, 0.02)}
    for version, precision in ((1, m_gpu["precision"]), (2, "fp32")):
        ids_g, f = store.read(version)
        assert np.array_equal(ids, ids_g)
        rel = np.linalg.norm(f - f_cpu, axis=1) / np.linalg.norm(f_cpu, axis=1)
        nearest = ((f[:, None, :] - f_cpu[None, :, :]) ** 2).sum(-1).argmin(1)
        print(f"v{version} ({precision}): relative error median {np.median(rel):.2e}, max {rel.max():.2e}")
        assert np.median(rel) < tol[precision][0] and rel.max() < tol[precision][1]
        assert np.array_equal(nearest, np.arange(len(ids)))


@pytest.mark.gpu
def test_cuda_extraction_actor_recording_fp32_runs_without_tf32(tf32_restored):
    from dataclasses import asdict

    from asvp_ray.features.extract import FeatureExtractor

    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    actor = FeatureExtractor(asdict(LITE0), None, 1, "cuda", amp="off")  # in this process, not as a Ray actor
    assert actor.precision == "fp32"
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32


def _loss(model, images, labels, spec):
    model = model.eval()
    x = Preprocessor(data_config(spec, model.backbone))(images)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels)))


@pytest.mark.gpu
@pytest.mark.parametrize("augment", [False, True])
def test_one_cuda_finetune_epoch_lowers_the_loss(ray_local, tmp_path, augment):
    from asvp_ray.data.fashion_mnist import read_idx
    from asvp_ray.train.finetune import build_classifier, finetune

    src = _fm(512)
    images, labels = read_idx(src.images_path)[:512], src.labels.astype(np.int64)
    before = _loss(build_classifier(LITE0, 10, seed=0), images, labels, LITE0)
    # Learning rates at which one epoch of 16 steps lowers the loss on the CPU (measured with
    # use_gpu=False): 2.33 -> 1.77 without augmentation, 2.33 -> 2.03 with it; the defaults
    # 0.01/0.1 raise it after one epoch (2.33 -> 2.59), before later epochs bring it down.
    cfg = TrainConfig(use_gpu=True, epochs=1, batch_size=32, augment=augment, eval_every=0, backbone_lr=0.003,
                      head_lr=0.03)
    res = finetune(src, src.ids, None, 10, LITE0, cfg, tmp_path, method="ft")
    assert res.precision == _expected_precision()
    state = torch.load(res.checkpoint, map_location="cpu", weights_only=False)
    assert state["precision"] == res.precision
    model = build_classifier(LITE0, 10, seed=0)
    model.backbone.load_state_dict(state["backbone"])
    model.head.load_state_dict(state["head"])
    after = _loss(model, images, labels, LITE0)
    print(f"augment={augment}: loss {before:.3f} -> {after:.3f} in {res.precision}, "
          f"{res.history[0]['images_per_s']:.0f} img/s")
    assert after < before - (0.1 if augment else 0.25)


@pytest.mark.gpu
def test_two_rank_nccl_ddp_step_gives_equal_parameters(ray_local, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL needs one GPU per rank; this machine has {torch.cuda.device_count()}")
    from asvp_ray.train.finetune import finetune

    src = _fm(256)
    cfg = TrainConfig(num_workers=2, use_gpu=True, cpus_per_worker=1, epochs=1, batch_size=32, augment=False)
    res = finetune(src, src.ids, None, 10, SPEC, cfg, tmp_path, method="ft")
    (h,) = res.history
    assert len(h["param_checksums"]) == 2 and h["param_checksums"][0] == h["param_checksums"][1]
    assert h["images"] == 256


@pytest.mark.gpu
def test_sharded_selection_with_a_cuda_fitted_proxy(ray_local):
    from asvp_ray.pool.view import PoolView
    from asvp_ray.selection import STRATEGIES
    from asvp_ray.selection.sharded import ShardedStrategy

    X, y = _blobs(4000, 64, 6, seed=2)
    mask = np.zeros(len(X), bool)
    mask[:300] = True
    proxy = MLPProxy(epochs=20, device="cuda", seed=0).fit(X[:300], y[:300])
    assert proxy.device_.type == "cuda"
    assert all(t.device.type == "cpu" for t in _tensors(proxy.__getstate__()))
    view = PoolView(ids=np.arange(len(X), dtype=np.int64) * 3 + 11, features=X, labeled_mask=mask, model=proxy)
    ms = ShardedStrategy(STRATEGIES.create("margin"), execution="sharded", num_shards=2)
    try:
        picked = ms.select(view, 100, np.random.default_rng(0))  # the shards (CPU-only actors) unpickle it
    finally:
        ms.close()
    cpu_copy = pickle.loads(pickle.dumps(proxy)).set_params(device="cpu")
    on_cpu = STRATEGIES.create("margin").select(PoolView(ids=view.ids, features=X, labeled_mask=mask, model=cpu_copy),
                                                100, np.random.default_rng(0))
    on_gpu = STRATEGIES.create("margin").select(view, 100, np.random.default_rng(0))
    np.testing.assert_array_equal(picked, on_cpu)
    assert len(np.intersect1d(picked, on_gpu)) >= 95  # CUDA and CPU scores differ only in rounding


@pytest.mark.gpu
def test_cuda_proxy_unpickles_in_a_process_without_cuda(tmp_path):
    X, y = _blobs()
    proxy = MLPProxy(epochs=5, device="cuda").fit(X, y)
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(proxy))
    np.save(tmp_path / "x.npy", X)
    code = ("import pickle, sys, numpy as np; p = pickle.load(open(sys.argv[1], 'rb')); "
            "np.save(sys.argv[3], p.predict_proba(np.load(sys.argv[2]))); print(p.device_)")
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.pkl"), str(tmp_path / "x.npy"),
                          str(tmp_path / "out.npy")], env=env, capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("cpu")
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), proxy.predict_proba(X), rtol=1e-4, atol=1e-5)


def test_a_run_directory_from_before_the_amp_choices_resumes():
    """config.yaml written when amp was a boolean and the train resources were fixed numbers
    still matches the same config file today (no 'differs in: train.amp' on resume)."""
    import yaml

    from asvp_ray.config import dump_config, upgrade_legacy_config
    from asvp_ray.loop.resume import config_differences

    new = yaml.safe_load(dump_config(load_config(str(SMOKE))))
    old = json.loads(json.dumps(new))
    old["train"].update(amp=True, cpus_per_worker=1.0, loader_workers=0)
    old["extract"]["amp"] = True
    assert config_differences(old, new)  # what the comparison saw before
    assert config_differences(upgrade_legacy_config(old), new) == []
    old["train"]["amp"] = False
    assert config_differences(upgrade_legacy_config(old), new) == ["train.amp"]  # a real difference stays
    assert upgrade_legacy_config(new) == new
