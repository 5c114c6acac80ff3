"""The model file: one ``.pt`` holding a fine-tuned backbone and its linear head.

Fine-tuning (:mod:`asvp_ray.train.finetune`) writes it; feature extraction (a refreshed
backbone, :func:`asvp_ray.features.backbones.create_backbone` with ``checkpoint=path``) and
scoring (:func:`asvp_ray.features.extract.predict_proba`) read it. Its keys: ``backbone``
and ``head`` (state dicts), ``num_classes``, ``spec``, ``method``, ``epochs``, ``epoch``,
``lp_epochs``, ``ft_epochs``.

The file may live in a local folder or at a URI (``s3://``, ``gs://``; the config's ``storage``)
through ``pyarrow.fs``: there it is written with one PUT (visible only whole) and read into
memory by whichever process needs it (the extraction actors on any node), so nothing depends on
the run directory being reachable. Every read is ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Dict, Union

from asvp_ray.core.errors import BadInputError
from asvp_ray.storage.locations import put_bytes, is_uri, join_uri, resolve_uri

#: name of the model file in a fine-tuning output folder.
MODEL_FILE = "model.pt"


def save_model_file(out_dir: Union[str, Path], backbone: Dict[str, Any], head: Dict[str, Any], **meta: Any) -> str:
    """Write ``out_dir/model.pt`` atomically (a reader never sees half a file): locally a
    temporary file renamed into place, at a URI one PUT of the whole file.

    Args:
        out_dir: a local folder, or a folder's URI (``s3://bucket/prefix?options``).
        backbone: the backbone's state dict (CPU tensors).
        head: the linear head's state dict (``weight``, ``bias``).
        meta: plain values stored next to them (``num_classes``, ``spec``, ``method`` ...).

    Returns:
        the path (or URI, with the folder's options) written.
    """
    import torch

    obj = {"backbone": backbone, "head": head, **meta}
    if is_uri(out_dir):
        location = join_uri(str(out_dir), MODEL_FILE)
        fs, path = resolve_uri(location)
        buf = io.BytesIO()
        torch.save(obj, buf)
        put_bytes(fs, path, buf.getvalue())
        return location
    path = Path(out_dir) / MODEL_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return str(path)


def read_torch_file(location: str, what: str = "checkpoint",
                    fix: str = "pass the model file finetune wrote") -> Any:
    """``torch.load(..., weights_only=True)`` of a local file or a URI (read whole into memory).

    Args:
        what: what the file is, for messages (``checkpoint``, ``weights file``).
        fix: what to do when it does not exist.

    Raises:
        BadInputError: the file is missing, cannot be reached, or torch cannot read it.
    """
    import pyarrow.fs as pafs
    import torch

    src: Any = location
    if is_uri(location):
        try:
            fs, path = resolve_uri(location)
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise BadInputError(f"{what} {location!r} does not exist; {fix}")
            with fs.open_input_stream(path) as f:
                src = io.BytesIO(f.read())
        except OSError as e:
            raise BadInputError(f"{what} {location}: cannot be read from the storage ({e}); check its endpoint "
                                "and credentials") from None
    elif not os.path.isfile(location):
        raise BadInputError(f"{what} {location!r} does not exist; {fix}")
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise BadInputError(f"{what} {location}: cannot be read by torch.load ({e})") from None


def load_head(checkpoint: str):
    """The linear head (``torch.nn.Linear``, eval mode) stored in a model file (a path or a URI).

    Raises:
        BadInputError: the file is missing, unreadable, or holds no head.
    """
    from torch import nn

    obj = read_torch_file(checkpoint)
    head = obj.get("head") if isinstance(obj, dict) else None
    if not isinstance(head, dict) or "weight" not in head or "bias" not in head:
        raise BadInputError(f"checkpoint {checkpoint} holds no classifier head; class probabilities need a "
                            "model file written by asvp_ray.train.finetune")
    w = head["weight"]
    lin = nn.Linear(w.shape[1], w.shape[0])
    lin.load_state_dict(head)
    return lin.eval()

