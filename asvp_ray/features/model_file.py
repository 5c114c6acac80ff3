"""The model file: one ``.pt`` holding a fine-tuned backbone and its linear head.

Fine-tuning (:mod:`asvp_ray.train.finetune`) writes it; feature extraction (a refreshed
backbone, :func:`asvp_ray.features.backbones.create_backbone` with ``checkpoint=path``) and
scoring (:func:`asvp_ray.features.extract.predict_proba`) read it. Its keys: ``backbone``
and ``head`` (state dicts), ``num_classes``, ``spec``, ``method``, ``epochs``, ``epoch``,
``lp_epochs``, ``ft_epochs``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from asvp_ray.errors import BadInputError

#: name of the model file in a fine-tuning output folder.
MODEL_FILE = "model.pt"


def save_model_file(out_dir: Union[str, Path], backbone: Dict[str, Any], head: Dict[str, Any], **meta: Any) -> str:
    """Write ``out_dir/model.pt`` atomically (a reader never sees half a file).

    Args:
        backbone: the backbone's state dict (CPU tensors).
        head: the linear head's state dict (``weight``, ``bias``).
        meta: plain values stored next to them (``num_classes``, ``spec``, ``method`` ...).

    Returns:
        the path written.
    """
    import torch

    path = Path(out_dir) / MODEL_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"backbone": backbone, "head": head, **meta}, tmp)
    os.replace(tmp, path)
    return str(path)


def load_head(checkpoint: str):
    """The linear head (``torch.nn.Linear``, eval mode) stored in a model file.

    Raises:
        BadInputError: the file is missing, unreadable, or holds no head.
    """
    import torch
    from torch import nn

    if not os.path.isfile(checkpoint):
        raise BadInputError(f"checkpoint {checkpoint!r} does not exist; pass the model file finetune wrote")
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BadInputError(f"checkpoint {checkpoint}: cannot be read by torch.load ({e})") from None
    head = obj.get("head") if isinstance(obj, dict) else None
    if not isinstance(head, dict) or "weight" not in head or "bias" not in head:
        raise BadInputError(f"checkpoint {checkpoint} holds no classifier head; class probabilities need a "
                            "model file written by asvp_ray.train.finetune")
    w = head["weight"]
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.load_state_dict(head)
    return lin.eval()


def load_model(spec, checkpoint: str, with_head: bool = True) -> Tuple[Any, Optional[Any]]:
    """The backbone of a model file (and its head when ``with_head``), on the CPU.

    Args:
        spec: the :class:`~asvp_ray.features.backbones.BackboneSpec` it was trained with.
    """
    from asvp_ray.features.backbones import create_backbone

    head = load_head(checkpoint) if with_head else None
    return create_backbone(spec, checkpoint), head
