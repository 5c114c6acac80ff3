"""timm backbones: the offline Lite0 weights, checkpoints, bad names and weights, preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.features.backbones import BackboneSpec, Preprocessor, create_backbone, data_config, weights_hash


def test_offline_lite0_weights_classify_the_daisy():
    """Mapped onto timm's model, the package's weights put sklearn's flower.jpg in class 985 (daisy)."""
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from asvp_ray.features.backbones import _load_raw, lite0_package_file, map_lite0_state_dict

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_lite0_state_dict(_load_raw(lite0_package_file()), model))
    model.eval()
    cfg = timm.data.resolve_model_data_config(model)
    x = timm.data.create_transform(**cfg)(Image.fromarray(load_sample_image("flower.jpg"))).unsqueeze(0)
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    assert p.argmax().item() == 985
    assert p[985].item() == pytest.approx(0.32, abs=0.02)


def test_lite0_backbone_has_pooled_features_and_lite0_normalisation():
    spec = BackboneSpec("tf_efficientnet_lite0", weights="auto", image_size=32, crop_pct=1.0)
    m = create_backbone(spec)
    assert m.num_classes == 0
    with torch.no_grad():
        assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 1280)
    cfg = data_config(spec, m)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["input_size"] == (3, 32, 32)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown timm model name 'tf_efficientnet_lite00'.*tf_efficientnet_lite0"):
        create_backbone(BackboneSpec("tf_efficientnet_lite00", weights="none"))


def test_checkpoint_roundtrip_and_weights_that_do_not_fit(tmp_path):
    a = create_backbone(BackboneSpec("test_efficientnet", weights="none", init_seed=1))
    torch.save({"state_dict": a.state_dict()}, tmp_path / "a.pth")
    b = create_backbone(BackboneSpec("test_efficientnet", weights=str(tmp_path / "a.pth")))
    assert weights_hash(a) == weights_hash(b)
    c = create_backbone(BackboneSpec("test_efficientnet", weights="none", init_seed=2))
    assert weights_hash(a) != weights_hash(c)
    other = create_backbone(BackboneSpec("test_resnet", weights="none"))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(BadInputError, match=r"do not fit model .*missing"):
        create_backbone(BackboneSpec("test_efficientnet", weights=str(tmp_path / "other.pth")))
    with pytest.raises(BadInputError, match="does not exist"):
        create_backbone(BackboneSpec("test_efficientnet", weights=str(tmp_path / "missing.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="cannot be read"):
        create_backbone(BackboneSpec("test_efficientnet", weights=str(tmp_path / "junk.pth")))


def test_preprocessor_grayscale_to_three_channels_and_resize():
    cfg = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0}
    pre = Preprocessor(cfg)
    gray = np.full((4, 28, 28), 255, dtype=np.uint8)
    x = pre(gray)
    assert x.shape == (4, 3, 32, 32)
    assert torch.allclose(x, torch.ones_like(x), atol=1e-5)  # (1 - 0.5) / 0.5
    mixed = np.empty(2, dtype=object)
    mixed[0] = np.zeros((40, 30, 3), dtype=np.uint8)
    mixed[1] = np.zeros((28, 28), dtype=np.uint8)
    y = pre(mixed)
    assert y.shape == (2, 3, 32, 32) and torch.allclose(y, -torch.ones_like(y))
    # a batch of equal-size images gives the same result as one image at a time
    r = np.random.default_rng(0).integers(0, 255, (3, 28, 28), dtype=np.uint8)
    singles = np.empty(3, dtype=object)
    singles[:] = list(r)
    assert torch.allclose(pre(r), pre(singles), atol=1e-5)


def test_weights_hash_from_the_file_equals_the_built_models_without_building_it(tmp_path, monkeypatch):
    """backbone_weights_hash gives weights_hash(create_backbone(...)) (feature caches are keyed by
    it) while building the architecture only on the meta device: the Lite0 package, a state dict,
    a model file's backbone, and a file of another dtype (loading converts it to float32)."""
    from asvp_ray.features import backbones as bb

    a = create_backbone(BackboneSpec("test_efficientnet", weights="none", init_seed=1))
    torch.save({"state_dict": a.state_dict()}, tmp_path / "a.pth")
    torch.save({"backbone": a.state_dict(), "head": {}}, tmp_path / "model.pt")
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in a.state_dict().items()},
               tmp_path / "a64.pth")
    lite0 = BackboneSpec("tf_efficientnet_lite0", weights="auto", image_size=32, crop_pct=1.0)
    ab = BackboneSpec("test_efficientnet", weights=str(tmp_path / "a.pth"))
    cases = [(lite0, None), (ab, None), (BackboneSpec("test_efficientnet", weights="none"), str(tmp_path / "model.pt")),
             (BackboneSpec("test_efficientnet", weights=str(tmp_path / "a64.pth")), None)]
    want = [weights_hash(create_backbone(spec, ckpt)) for spec, ckpt in cases]
    assert want[1] == want[2] == weights_hash(a) and want[0] == "653246f58bc51a83"  # Lite0's hash before this change

    built = []
    real_timm = bb._timm

    def on_which_device(name, **kw):
        built.append((name, torch.empty(0).device.type))  # the default device where timm builds it
        return real_timm(name, **kw)

    monkeypatch.setattr(bb, "_timm", on_which_device)
    monkeypatch.setattr(bb, "create_backbone", lambda *a, **k: pytest.fail("built the model to hash it"))
    got = [bb.backbone_weights_hash(spec, ckpt) for spec, ckpt in cases]
    assert got == want
    assert built and {device for _, device in built} == {"meta"}
    other = create_backbone(BackboneSpec("test_resnet", weights="none"))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(BadInputError, match=r"do not fit model .*missing"):
        bb.backbone_weights_hash(BackboneSpec("test_efficientnet", weights=str(tmp_path / "other.pth")))
    with pytest.raises(BadInputError, match="does not exist"):
        bb.backbone_weights_hash(ab, checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="lite0_package fits only tf_efficientnet_lite0"):
        bb.backbone_weights_hash(BackboneSpec("test_efficientnet", weights="lite0_package"))


def test_the_architecture_on_the_meta_device_gives_the_built_models_data_config():
    """extract_to_store records data_config and sizes its parts from the meta-device architecture."""
    from asvp_ray.features.backbones import backbone_architecture

    for spec in (BackboneSpec("tf_efficientnet_lite0", weights="auto", image_size=32, crop_pct=1.0),
                 BackboneSpec("test_efficientnet", weights="none")):
        arch, built = backbone_architecture(spec), create_backbone(spec)
        assert next(arch.parameters()).device.type == "meta"
        assert data_config(spec, arch) == data_config(spec, built)
        assert arch.num_features == built.num_features


def _real_images():
    """Real images as users hand them over: 16 Fashion-MNIST test images (28 x 28 grayscale, the
    arrays the project reads from the IDX file) and sklearn's two bundled photographs (RGB,
    427 x 640: not square, much larger than the model's input)."""
    from sklearn.datasets import load_sample_image

    from asvp_ray.data.fashion_mnist import ensure, read_idx, split_paths

    images, _ = split_paths(ensure(), "test")
    return list(read_idx(images)[:16]) + [load_sample_image("flower.jpg"), load_sample_image("china.jpg")]


PREPROCESS_SPECS = [
    BackboneSpec("test_efficientnet", weights="none", image_size=32, crop_pct=1.0),  # examples/smoke.yaml
    BackboneSpec("tf_efficientnet_lite0", weights="auto", image_size=32, crop_pct=1.0),  # examples/fashion_mnist.yaml
    BackboneSpec("test_efficientnet", weights="none"),  # timm's own: 160 px, crop_pct 0.95
    BackboneSpec("efficientnet_lite0", weights="none"),  # timm's own: 224 px, crop_pct 0.875
]



def _timm_transform_and_cfg(spec):
    """timm's own eval transform for ``spec`` (resolve_data_config + create_transform, no weights
    needed) with the spec's overrides, and the project's data_config; checks they hold the same settings."""
    import timm.data

    model = create_backbone(spec)
    cfg = data_config(spec, model)
    timm_cfg = timm.data.resolve_data_config(model=model)
    if spec.image_size is not None:  # the spec's overrides, as the project applies them
        timm_cfg.update(input_size=(3, spec.image_size, spec.image_size), crop_pct=spec.crop_pct)
    if spec.resolved_weights() == "lite0_package":
        timm_cfg.update(mean=(0.5,) * 3, std=(0.5,) * 3)
    assert {k: tuple(float(x) for x in timm_cfg[k]) for k in ("mean", "std")} == {k: cfg[k] for k in ("mean", "std")}
    assert tuple(timm_cfg["input_size"]) == cfg["input_size"] and timm_cfg["crop_pct"] == cfg["crop_pct"]
    assert timm_cfg["interpolation"] == cfg["interpolation"] == "bicubic"
    return timm.data.create_transform(**timm_cfg, is_training=False), cfg


def _off_timm(spec, preprocess):
    """For each real image: (largest difference, share of values over half a level), in uint8 levels,
    between ``preprocess(cfg)(uint8 (1,H,W[,C]))[0]`` and timm's transform of the image converted to RGB."""
    from PIL import Image

    transform, cfg = _timm_transform_and_cfg(spec)
    pre = preprocess(cfg)
    size = cfg["input_size"][-1]
    level = torch.tensor(cfg["std"]).view(3, 1, 1) * 255.0  # one uint8 level, normalised
    out = []
    for img in _real_images():
        want = transform(Image.fromarray(img).convert("RGB"))
        got = pre(img[None])[0]
        assert got.shape == want.shape == (3, size, size)
        off = (got - want).abs() * level
        out.append((round(off.max().item(), 3), round((off > 0.5).float().mean().item(), 4)))
    return out


def _within_tolerance(offs):
    return all(worst <= 2.001 and share <= 0.02 for worst, share in offs)


class _PILLikeResize:
    """A resize written for this test from torchvision's and PIL's definitions: long side truncated
    (torchvision Resize), crop offset round((n - size) / 2) (CenterCrop), torch's uint8 antialiased
    bicubic interpolate (PIL's two uint8 passes). Shows the tolerance is met by a correct resize."""

    def __init__(self, cfg):
        self.size, self.scale = cfg["input_size"][-1], int(np.floor(cfg["input_size"][-1] / cfg["crop_pct"]))
        self.mean, self.std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def __call__(self, batch):
        x = torch.from_numpy(np.array(batch if batch.ndim == 4 else np.repeat(batch[..., None], 3, -1))).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        nh, nw = (self.scale, int(self.scale * w / h)) if h <= w else (int(self.scale * h / w), self.scale)
        if (nh, nw) != (h, w):
            x = torch.nn.functional.interpolate(x.contiguous(), size=(nh, nw), mode="bicubic", antialias=True)
        top, left = round((nh - self.size) / 2.0), round((nw - self.size) / 2.0)
        x = x[..., top:top + self.size, left:left + self.size].float() / 255.0
        return (x - self.mean) / self.std


@pytest.mark.parametrize("spec", PREPROCESS_SPECS, ids=lambda s: f"{s.name}-{s.image_size or 'timm'}")
def test_the_timm_comparison_passes_a_pil_like_resize_and_fails_a_shifted_one(spec):
    """The harness of the next test: a resize following torchvision's and PIL's definitions meets its
    tolerance on every image, and the same resize with the crop moved by one pixel does not."""
    assert _within_tolerance(_off_timm(spec, _PILLikeResize))

    class Shifted(_PILLikeResize):
        def __call__(self, batch):
            return torch.roll(super().__call__(batch), 1, dims=-1)

    assert not _within_tolerance(_off_timm(spec, Shifted))


# The Preprocessor differs from timm's transform; found by this test, left for the lead (asvp_ray/ is
# not this change's to edit). Three causes, each measured: (1) the resized long side is rounded
# (round(640 * 32 / 427) = 48) where torchvision's Resize truncates (47): a different pixel grid,
# up to 125 levels off on the photographs; (2) the centre crop's offset is (n - size) // 2 where
# torchvision's CenterCrop takes round((n - size) / 2); (3) PIL resizes in two uint8 passes
# (horizontal, rounded and clipped to 0..255, then vertical), the Preprocessor in one float pass:
# bicubic overshoot at Fashion-MNIST's sharp edges is clipped in between by PIL only, 6 to 13 levels
# off on ~10% of the pixels. _PILLikeResize (int() for the long side, round() for the offset, torch's
# uint8 antialiased interpolate) meets the tolerance on all four specs (at most 2 levels, 0.6% of
# values over half a level, 1.1% on the worst image). strict: a fix turns this red, so the mark goes with the fix.
@pytest.mark.xfail(strict=True, reason="Preprocessor resizes and crops unlike timm's PIL transform (see comment)")
@pytest.mark.parametrize("spec", PREPROCESS_SPECS, ids=lambda s: f"{s.name}-{s.image_size or 'timm'}")
def test_preprocessor_equals_timms_eval_transform_on_real_images(spec):
    """The Preprocessor gives what timm's own eval transform (resolve_data_config + create_transform:
    PIL resize, centre crop, normalise) gives on the same real image, grayscale converted to RGB as a
    timm user would. Tolerance: PIL resizes in fixed-point uint8 arithmetic, so a value may be off by
    up to 2 uint8 levels (2 / 255 / std once normalised), and at most 2% of values by more than half
    a level; a wrong size, crop offset, interpolation, mean or std moves most values by far more."""
    offs = _off_timm(spec, Preprocessor)
    assert _within_tolerance(offs), offs
