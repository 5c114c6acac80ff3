"""Fine-tuning with Ray Train: the three methods learn, DDP keeps one model, a killed worker
resumes from its checkpoint, the model file loads everywhere. Workers on two nodes: the two-node
job in ``tests/test_cluster.py`` (its fine-tune workers run on both nodes).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asvp_ray.data.fashion_mnist import FashionMNISTSource, read_idx
from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.features.backbones import BackboneSpec, Preprocessor, create_backbone, data_config
from asvp_ray.train.config import TrainConfig
from asvp_ray.features.extract import predict_proba
from asvp_ray.features.model_file import load_head
from asvp_ray.train.finetune import build_classifier, feature_width, finetune

SPEC = BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0)
# A linear probe needs features worth probing: random-init features let even a fitted logistic
# regression reach only ~0.3 here, so the probing methods use the offline pre-trained Lite0.
LITE0 = BackboneSpec("tf_efficientnet_lite0", weights="auto", image_size=32, crop_pct=1.0)
N_TRAIN, N_TEST = 400, 200
FAST = dict(batch_size=32, epochs=3, lp_epochs=2)


@pytest.fixture(scope="module")
def fm():
    """Tiny Fashion-MNIST subsets: 400 labelled images, 200 held out."""
    return FashionMNISTSource(split="train", limit=N_TRAIN), FashionMNISTSource(split="test", limit=N_TEST)


def untrained_accuracy(test: FashionMNISTSource, seed: int = 0, spec: BackboneSpec = SPEC) -> float:
    """Accuracy of the same model before training: the backbone and the freshly seeded head."""
    model = build_classifier(spec, 10, seed=seed).eval()
    x = Preprocessor(data_config(spec, model.backbone))(read_idx(test.images_path)[:len(test)])
    with torch.no_grad():
        return float((model(x).argmax(1).numpy() == test.labels).mean())


# --------------------------------------------------------------------------- config (no Ray)
def test_config_errors_name_the_fix():
    cfg = TrainConfig(use_gpu=True)
    with pytest.raises(ConfigError, match="use_gpu=True but the cluster has no GPU; set use_gpu: auto or false"):
        cfg.plan({"CPU": 8})
    with pytest.raises(ConfigError, match="needs 3 CPUs but the cluster has 2.*num_workers <= 2"):
        TrainConfig(num_workers=3).plan({"CPU": 2})
    with pytest.raises(ConfigError, match="needs 4 GPUs but the cluster has 2; set num_workers: 2"):
        TrainConfig(num_workers=4, use_gpu=True).plan({"CPU": 8, "GPU": 2})
    with pytest.raises(ConfigError, match="method ft needs epochs >= 1"):
        TrainConfig(epochs=0).epochs_of("ft")
    with pytest.raises(ConfigError, match="unknown fine-tuning method 'fft'"):
        TrainConfig().epochs_of("fft")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(epoch=3)
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=(0.5, 0.2))


def test_plan_uses_gpus_when_auto_finds_enough():
    gpu = TrainConfig(num_workers=2, cpus_per_worker=2).plan({"CPU": 8, "GPU": 2})
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 2.0, "GPU": 1.0} and gpu.torch_threads == 2
    cpu = TrainConfig(num_workers=2).plan({"CPU": 2, "GPU": 1})  # one GPU for two workers: CPU
    assert not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 1.0}
    assert TrainConfig(use_gpu=False).plan({"CPU": 2, "GPU": 4}).use_gpu is False
    assert TrainConfig(lp_epochs=2, epochs=3).epochs_of("lpft") == (2, 3)
    assert TrainConfig(lp_epochs=2, epochs=0).epochs_of("linear_probe") == (2, 0)


# --------------------------------------------------------------------------- inputs refused early
def test_bad_inputs_are_refused_before_training(ray_local, fm, tmp_path):
    pool, _ = fm
    cfg = TrainConfig(**FAST)
    ids = pool.ids[:10]
    with pytest.raises(BadInputError, match="9 labels for 10 ids"):
        finetune(pool, ids, pool.labels[:9], 10, SPEC, cfg, tmp_path)
    with pytest.raises(BadInputError, match=r"labels \[10\] are outside 0..9"):
        finetune(pool, ids, np.full(10, 10), 10, SPEC, cfg, tmp_path)
    with pytest.raises(ConfigError, match="unknown fine-tuning method 'probe'"):
        finetune(pool, ids, None, 10, SPEC, cfg, tmp_path, method="probe")
    with pytest.raises(ConfigError, match="needs 4 CPUs but the cluster has 2"):
        finetune(pool, ids, None, 10, SPEC, TrainConfig(num_workers=4), tmp_path)
    with pytest.raises(BadInputError, match="does not exist"):
        finetune(pool, ids, None, 10, SPEC, cfg, tmp_path, init_checkpoint=str(tmp_path / "nope.pt"))


def test_predict_proba_needs_a_model_file_with_a_head(ray_local, fm, tmp_path):
    from asvp_ray.config import ExtractConfig

    pool, _ = fm
    path = tmp_path / "backbone_only.pt"
    torch.save({"backbone": create_backbone(SPEC).state_dict()}, path)
    with pytest.raises(BadInputError, match="holds no classifier head"):
        predict_proba(pool, pool.ids[:5], str(path), SPEC, ExtractConfig(progress=False))


# --------------------------------------------------------------------------- the three methods
# LP-FT fine-tunes a pre-trained backbone on 32-px images in batches of 32: with the default FT
# recipe (BatchNorm on batch statistics, lr 0.01/0.1) its first FT epoch throws away what the
# probe learned (eval 0.645 -> 0.105 here); fixed BN statistics and 10x lower rates keep it.
GENTLE_FT = dict(freeze_bn=True, backbone_lr=0.001, head_lr=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("method, spec, extra", [("linear_probe", LITE0, {}), ("ft", SPEC, {}),
                                                 ("lpft", LITE0, GENTLE_FT)])
def test_method_beats_the_untrained_head(ray_local, fm, tmp_path, method, spec, extra):
    pool, test = fm
    cfg = TrainConfig(**FAST, **extra)
    res = finetune(pool, pool.ids, None, 10, spec, cfg, tmp_path, method=method, eval_source=test)

    before = untrained_accuracy(test, cfg.seed, spec)
    assert before < 0.25  # an untrained head is near chance (10 classes)
    assert res.test_accuracy is not None and res.test_accuracy > before + 0.2, (method, before, res.history)
    if method == "lpft":  # fine-tuning starts from the probe's head, not a fresh one
        assert res.history[cfg.lp_epochs]["eval_accuracy"] > before + 0.2, res.history

    lp, ft = cfg.epochs_of(method)
    assert [h["epoch"] for h in res.history] == list(range(lp + ft))
    assert [h["phase"] for h in res.history] == ["lp"] * lp + ["ft"] * ft
    assert all(h["images"] == N_TRAIN for h in res.history)
    assert res.kept_epoch == lp + ft - 1 and res.resumed_from == [] and len(res.worker_nodes) == 1
    assert res.checkpoint == str(tmp_path / "model.pt") and not any((tmp_path / "ray").glob("finetune-*"))

    saved = torch.load(res.checkpoint, weights_only=True)
    assert saved["method"] == method and saved["num_classes"] == 10 and saved["epochs"] == lp + ft
    initial_model = create_backbone(spec)
    assert saved["spec"]["name"] == spec.name and saved["head"]["weight"].shape == (10, feature_width(initial_model))
    tuned = create_backbone(spec, checkpoint=res.checkpoint).state_dict()
    initial = initial_model.state_dict()
    same = all(torch.equal(tuned[k], initial[k]) for k in initial)
    assert same == (method == "linear_probe")  # only the probe leaves the backbone (and its BN stats) alone

    if method == "lpft":  # the pool scored through the Ray Data actor pool agrees with training's eval
        from asvp_ray.config import ExtractConfig

        ids, probs = predict_proba(test, None, res.checkpoint, spec, ExtractConfig(batch_size=64, progress=False))
        assert np.array_equal(ids, test.ids) and probs.shape == (N_TEST, 10) and probs.dtype == np.float32
        model = create_backbone(spec, checkpoint=res.checkpoint)
        x = Preprocessor(data_config(spec, model))(read_idx(test.images_path)[:N_TEST])
        with torch.no_grad():
            want = torch.softmax(load_head(res.checkpoint)(model(x)), 1).numpy()
        np.testing.assert_allclose(probs, want, atol=1e-4)  # the same model, scored in this process
        acc = float((probs.argmax(1) == test.labels).mean())
        assert acc == pytest.approx(res.test_accuracy, abs=0.011)


def test_eval_every_skips_epochs_but_never_the_last(ray_local, fm, tmp_path):
    """eval_every=2 over 3 epochs evaluates after epochs 1 and 2 (the last) only; keep=best chooses
    among those, and the reported test accuracy is the kept epoch's."""
    pool, test = fm
    cfg = TrainConfig(batch_size=32, epochs=3, eval_every=2, keep="best", augment=False)
    res = finetune(pool, pool.ids[:96], None, 10, SPEC, cfg, tmp_path, method="ft", eval_source=test)
    evaluated = [h["epoch"] for h in res.history if h.get("eval_accuracy") is not None]
    assert evaluated == [1, 2], res.history
    assert res.kept_epoch in (1, 2)
    assert res.test_accuracy == res.history[res.kept_epoch]["eval_accuracy"]
    assert res.test_accuracy == max(res.history[e]["eval_accuracy"] for e in evaluated)


# --------------------------------------------------------------------------- memory of the caller
MEM_SIZE = 96  # px: 2,000 RGB images decode to 55 MB, far above the caller's noise


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    """2,000 random 96x96 RGB PNGs in two class folders (an image_folder source)."""
    from asvp_ray.data.files import ImageFolderSource
    from tests.conftest import write_images

    root = tmp_path_factory.mktemp("big_images")
    for k, name in enumerate(("a", "b")):
        write_images(root / name, 1000, size=(MEM_SIZE, MEM_SIZE), seed=k)
    return ImageFolderSource(str(root))


def _peak_rss_growth(fn) -> int:
    """Bytes the calling process's RSS rose above its value before ``fn()`` at its peak (sampled
    every 10 ms in a thread)."""
    import threading

    import ray  # noqa: F401 - Ray ships psutil and puts it on the path

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return peak[0] - base


@pytest.mark.slow
def test_caller_memory_does_not_grow_with_the_labelled_set(ray_local, big_images, tmp_path):
    """Images are decoded by Ray Data tasks and read by the workers from the object store: the
    process that calls ``finetune`` holds no image array, so its peak memory stays far below the
    decoded labelled set (2,000 x 96 x 96 x 3 bytes = 55 MB)."""
    import gc

    src = big_images
    cfg = TrainConfig(batch_size=100, epochs=1, augment=False, eval_every=0, max_failures=0)

    def run(n, name):
        ids = src.ids[:n]
        return finetune(src, ids, src.label_of(ids), 2, SPEC, cfg, tmp_path / name)

    run(200, "warm-up")  # imports, Ray Data and Ray Train start-up state in this process
    gc.collect()
    big = _peak_rss_growth(lambda: run(2000, "n2000"))
    decoded = 2000 * MEM_SIZE * MEM_SIZE * 3
    print(f"caller peak RSS growth: 2,000 images {big / 2**20:.1f} MB (decoded: {decoded / 2**20:.1f} MB)")
    assert big < 0.5 * decoded, (big, decoded)


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_ddp_workers_train_one_model(ray_local, fm, tmp_path):
    pool, test = fm
    cfg = TrainConfig(num_workers=2, batch_size=32, lp_epochs=1, epochs=3)
    res = finetune(pool, pool.ids, None, 10, SPEC, cfg, tmp_path, method="lpft")
    assert len(res.worker_nodes) == 2 and [h["phase"] for h in res.history] == ["lp", "ft", "ft", "ft"]
    sums = [h["param_checksums"] for h in res.history]
    for epoch_sums in sums:  # after every epoch, both ranks hold bit-identical parameters
        assert len(epoch_sums) == 2 and epoch_sums[0] == epoch_sums[1]
    assert len({tuple(s[0]) for s in sums}) == len(sums)  # and they moved every epoch (LP, then FT)
    assert all(h["images"] == N_TRAIN for h in res.history)  # the sampler split the set, not copied it
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 0.1
    assert res.test_accuracy is None  # no eval set given


# --------------------------------------------------------------------------- failure and restart
@pytest.mark.slow
def test_killed_worker_resumes_from_its_checkpoint(ray_local, fm, tmp_path):
    pool, test = fm
    marker = tmp_path / "killed-once"

    def kill_rank0_once(epoch, rank, marker=str(marker)):
        import os
        import signal

        if rank == 0 and epoch == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    # keep="best": the best epoch so far travels in the checkpoint, so it survives the restart
    cfg = TrainConfig(num_workers=2, batch_size=32, epochs=5, max_failures=1, keep="best")
    res = finetune(pool, pool.ids[:200], None, 10, SPEC, cfg, tmp_path, method="ft", eval_source=test,
                   on_epoch_end=kill_rank0_once)
    assert marker.exists()  # the worker was killed ...
    assert len(res.resumed_from) == 1 and 1 <= res.resumed_from[0] <= 3, res.resumed_from  # ... resumed mid-run
    assert [h["epoch"] for h in res.history] == list(range(5))  # each epoch once, none lost
    assert [h["lr"] for h in res.history] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])  # schedule resumed too
    for h in res.history:
        assert h["param_checksums"][0] == h["param_checksums"][1]
    accs = [h["eval_accuracy"] for h in res.history]
    assert res.kept_epoch == int(np.argmax(accs)) and res.test_accuracy == max(accs)
    saved = torch.load(res.checkpoint, weights_only=True)
    assert saved["epoch"] == res.kept_epoch
    # the backbone built from the model file carries the kept epoch's weights, not the initial ones
    loaded = create_backbone(SPEC, checkpoint=res.checkpoint).state_dict()
    fresh = create_backbone(SPEC).state_dict()
    floats = [k for k, v in saved["backbone"].items() if v.is_floating_point() and k in loaded]
    assert floats and all(torch.equal(loaded[k].cpu(), saved["backbone"][k]) for k in floats)
    assert any(not torch.equal(fresh[k], saved["backbone"][k]) for k in floats), "training changed no weight"
