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
