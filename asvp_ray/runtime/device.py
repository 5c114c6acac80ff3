"""Where compute runs: mixed-precision choice, device-side preprocessing, GPU library checks,
compute threads (this process's memory and allocators: :mod:`asvp_ray.runtime.allocator`).

Everything here is decided where the work runs (an extraction actor, a Ray Train worker), from
what that process sees: its device and, on CUDA, the card's compute capability. The choice
itself is a pure function of those facts (:func:`choose_precision`), so it is tested without a
GPU.

Precision rules (``amp`` in ``extract:`` and ``train:``):

- ``off``: float32 everywhere.
- ``bf16``: bfloat16 autocast; only on compute capability >= 8.0 (Ampere and later). Older cards
  (T4, V100) report bf16 as supported but emulate it, slower than float32, so it is refused.
- ``fp16``: float16 autocast; training scales the loss with ``torch.amp.GradScaler``.
- ``auto`` (default): bf16 on capability >= 8.0, else fp16.
- On CPU every setting means float32: CPU results never change with ``amp``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from asvp_ray.core.errors import ConfigError

log = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
PRECISIONS = ("fp32", "bf16", "fp16")
BF16_MIN_CAPABILITY = (8, 0)


def normalize_amp(value: Union[str, bool, None], key: str = "amp") -> str:
    """An ``amp`` setting as one of :data:`AMP_CHOICES`; booleans of older configs map to
    ``auto`` (true) and ``off`` (false).

    Raises:
        ConfigError: any other value, naming the key and the choices.
    """
    if value is True:
        return "auto"
    if value is False or value is None:
        return "off"
    if isinstance(value, str) and value.lower() in AMP_CHOICES:
        return value.lower()
    raise ConfigError(f"{key}={value!r} is not one of {', '.join(AMP_CHOICES)} (auto: bf16 on GPUs of compute "
                      "capability >= 8.0, fp16 on older ones; off: float32)")


def choose_precision(amp: Union[str, bool], device_type: str, capability: Optional[Sequence[int]] = None,
                     gpu_name: str = "this GPU", key: str = "amp") -> str:
    """The precision a process computes in.

    Args:
        amp: the configured setting (``auto|off|bf16|fp16``; a bool of an older config).
        device_type: the torch device type the work runs on (``cpu``, ``cuda``).
        capability: the CUDA compute capability ``(major, minor)``; needed for ``cuda``.
        gpu_name: the card's name, for the error message.
        key: the config key, for the error message.

    Returns:
        ``fp32``, ``bf16`` or ``fp16``.

    Raises:
        ConfigError: ``bf16`` asked for on a card older than compute capability 8.0.
    """
    amp = normalize_amp(amp, key)
    if device_type != "cuda" or amp == "off":
        return "fp32"
    if capability is None:
        raise ValueError("choose_precision on cuda needs the device's compute capability")
    cap = (int(capability[0]), int(capability[1]))
    bf16_native = cap >= BF16_MIN_CAPABILITY
    if amp == "auto":
        return "bf16" if bf16_native else "fp16"
    if amp == "bf16" and not bf16_native:
        raise ConfigError(
            f"{key}: bf16 needs a GPU of compute capability 8.0 or higher (A100, A10, L4, H100, ...); {gpu_name} "
            f"has {cap[0]}.{cap[1]}, where bf16 is emulated and slower than float32; set {key}: fp16 or auto")
    return amp


#: why a Ray worker that reserved no GPU may not use one, and the fix (shared by torch and faiss).
UNRESERVED_GPU = ("this Ray task or actor reserved no GPU (Ray >= 2.48 no longer hides GPUs from tasks and actors "
                  "that reserve none, and using one takes memory and time from the work that reserved it)")
RESERVE_GPU_FIX = "reserve one for the task or actor that runs it (num_gpus=1 in its ray.remote options)"


def ray_gpu_reservation() -> Optional[List[str]]:
    """The GPU ids Ray reserved for this process when it is a Ray task or actor (worker mode):
    ``get_runtime_context().get_accelerator_ids()["GPU"]``, else ``ray.get_gpu_ids()``.

    Returns:
        the ids (empty: it reserved none); None where Ray's reservation does not apply: Ray is
        not imported or not initialised, this process is a driver, or the context cannot be read.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.worker.mode != ray.WORKER_MODE:
            return None
        ids = ctx.get_accelerator_ids().get("GPU")
        if ids is None:
            ids = ray.get_gpu_ids()
        return [str(i) for i in ids]
    except Exception:  # noqa: BLE001 - outside a normal Ray context: no reservation to honour
        return None


def unreserved_gpu_reason(reserved: Optional[Sequence[Any]]) -> str:
    """Why this process may not use a GPU given Ray's reservation (:func:`ray_gpu_reservation`):
    ``""`` when it may (no Ray worker context: None; or at least one GPU reserved), else
    :data:`UNRESERVED_GPU`. A pure function, so the rule is tested without Ray or a GPU."""
    if reserved is None or len(reserved) > 0:
        return ""
    return UNRESERVED_GPU


def usable_cuda() -> Tuple[bool, str]:
    """Whether this process may compute on CUDA, and why not.

    Inside a Ray task or actor that reserved no GPU the answer is no even when torch sees one:
    Ray (>= 2.48) no longer hides GPUs from such workers, and using one would take memory and
    time from the task that reserved it.
    """
    import torch

    if not torch.cuda.is_available():
        return False, "this process sees no CUDA device"
    why = unreserved_gpu_reason(ray_gpu_reservation())
    if why:
        return False, why
    return True, ""


def torch_dtype(precision: str):
    """The autocast dtype of a precision (None for fp32)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(precision: str, device_type: str = "cuda"):
    """``torch.autocast`` for ``precision`` (a no-op context for fp32)."""
    import torch

    dtype = torch_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def cuda_facts(device=None) -> Dict[str, Any]:
    """Name and compute capability of a CUDA device of this process."""
    import torch

    cap = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "capability": [int(cap[0]), int(cap[1])]}


def tune_for_cuda() -> None:
    """Process-wide settings that help fixed-shape convolutional work on CUDA: cuDNN autotunes
    its kernels per input shape (batches here have one shape, bar the last). TF32 is set by
    :func:`match_tf32`, from the precision recorded for the work."""
    import torch

    torch.backends.cudnn.benchmark = True


def tf32_flags(precision: str, device_type: str) -> Optional[Dict[str, Any]]:
    """The TF32 settings that make CUDA compute what ``precision`` records (a pure function).

    ``fp32`` on CUDA means IEEE float32: TF32 off for matmuls (``float32_matmul_precision``
    ``"highest"``, which also turns ``torch.backends.cuda.matmul.allow_tf32`` off) and for cuDNN
    convolutions (``torch.backends.cudnn.allow_tf32``, on by default in PyTorch). Under bf16/fp16
    autocast the float32 ops that remain keep PyTorch's defaults (None: nothing to set), as on
    the CPU, which has no TF32.
    """
    if device_type != "cuda" or precision != "fp32":
        return None
    return {"float32_matmul_precision": "highest", "cudnn_allow_tf32": False}


def match_tf32(precision: str, device_type: str) -> Optional[Dict[str, Any]]:
    """Apply :func:`tf32_flags` to this process (call it where the model goes to CUDA, with the
    precision that meta.json or the model file records), so that a recorded ``fp32`` is float32
    and not TF32. Returns what was set (None: nothing)."""
    import torch

    flags = tf32_flags(precision, device_type)
    if flags is None:
        return None
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = False  # what "highest" implies; set for older torch too
    torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
    return flags


# --------------------------------------------------------------------------- preprocessing
class DevicePreprocessor:
    """The eval preprocessing of a :class:`~asvp_ray.features.backbones.Preprocessor`, run on
    the compute device: images travel as uint8 (a quarter of float32's bytes) from pinned host
    memory, and are resized, cropped and normalised on the device.

    On ``cpu`` it gives exactly the ``Preprocessor``'s output (same operations, same order).

    Args:
        pre: the host ``Preprocessor`` (sizes, interpolation, mean and std).
        device: the torch device to preprocess on.
        channels_last: return the batch in channels-last memory format (faster convolutions
            with cuDNN under autocast).
        resize: resize and crop to the input size (False: the batches arrive at that size
            already, brought there by ``Preprocessor.fit`` in extraction's read tasks; only the
            layout and the normalisation remain).
    """

    def __init__(self, pre, device, channels_last: bool = False, resize: bool = True):
        import torch

        self.pre = pre
        self.resize = resize
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.mean = pre.mean.to(self.device)
        self.std = pre.std.to(self.device)
        self._pin = self.device.type == "cuda"
        self._staging = None  # a pinned uint8 buffer reused across batches

    def _upload(self, arr: np.ndarray):
        import torch

        src = torch.from_numpy(np.require(arr, requirements=["C", "W"]))  # object-store batches are read-only
        if not self._pin:
            return src.to(self.device)
        n = src.numel()
        if self._staging is None or self._staging.numel() < n or self._staging.dtype != src.dtype:
            self._staging = torch.empty(max(n, 1), dtype=src.dtype).pin_memory()
        buf = self._staging[:n].view(src.shape)
        buf.copy_(src)
        # Asynchronous copy; the staging buffer is reused only after the caller has synchronised
        # on this batch's result (every caller reads its output back to the host).
        return buf.to(self.device, non_blocking=True)

    def _layout(self, t, batched: bool):
        """uint8 (B,H,W[,C]) or (H,W[,C]) -> (B,3,H,W), the host preprocessor's layout rule."""
        return self.pre.batch_to_nchw3(t if batched else t.unsqueeze(0))

    def __call__(self, images):
        """Args: a uint8 array (B,H,W[,C]), a uint8 tensor of that shape, or a sequence of
        HxW[xC] arrays. Returns: float32 (B, 3, size, size) on the device."""
        import torch

        if isinstance(images, torch.Tensor):
            x = self._layout(images.to(self.device, non_blocking=True), True).float()
            x = self.pre._resize_crop(x) if self.resize else x
        elif isinstance(images, np.ndarray) and images.dtype != object:
            x = self._layout(self._upload(images), True).float()
            x = self.pre._resize_crop(x) if self.resize else x
        else:
            x = torch.cat([self.pre._resize_crop(self._layout(torch.from_numpy(np.require(im, requirements=["C"]))
                                                              .to(self.device, non_blocking=self._pin), False)
                                                 .float()) for im in images])
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


# --------------------------------------------------------------------------- faiss
def _faiss_gpu_check(reserved: Optional[Sequence[Any]] = None) -> Tuple[bool, str, str]:
    """(ok, why, fix) of :func:`faiss_gpu_available`; ``reserved``: Ray's GPU reservation of
    this process (:func:`ray_gpu_reservation`; None outside a Ray task or actor)."""
    install = ("install a GPU build of faiss (conda install -c pytorch faiss-gpu, or pip install faiss-gpu-cu12) "
               "and run where a GPU is reserved")
    try:
        import faiss
    except ImportError:
        return False, "faiss is not installed", install
    if not hasattr(faiss, "StandardGpuResources"):
        return (False, f"the installed faiss {getattr(faiss, '__version__', '?')} is a CPU-only build (faiss-cpu)",
                install)
    why = unreserved_gpu_reason(reserved)
    if why:  # faiss counts every GPU the process can see, reserved or not
        return False, why, RESERVE_GPU_FIX
    try:
        n = int(faiss.get_num_gpus())
    except Exception as e:  # noqa: BLE001 - a broken CUDA set-up reads as "no GPU"
        return False, f"faiss cannot count GPUs ({e})", install
    if n < 1:
        return False, "faiss sees no GPU in this process", install
    return True, f"faiss sees {n} GPU(s)", ""


def faiss_gpu_available() -> Tuple[bool, str]:
    """Whether a GPU build of faiss is importable and may use a GPU here, and why not: it must
    see one, and inside a Ray task or actor that task must have reserved one (Ray no longer
    hides unreserved GPUs, so faiss would see and take them)."""
    ok, why, _ = _faiss_gpu_check(ray_gpu_reservation())
    return ok, why


def require_faiss_gpu(where: str) -> None:
    """Refuse ``use_gpu=True`` unless faiss can actually run on a GPU here (it would otherwise
    run on the CPU without a word, or on a GPU that Ray reserved for other work).

    Raises:
        ConfigError: naming the strategy, the reason and the fix.
    """
    ok, why, fix = _faiss_gpu_check(ray_gpu_reservation())
    if not ok:
        raise ConfigError(f"{where}: use_gpu=True but {why}; {fix}, or set use_gpu=False")


def thread_env(threads: int) -> dict:
    """Environment variables that size OpenMP/BLAS thread pools, for a Ray ``runtime_env``: Ray
    sets ``OMP_NUM_THREADS`` to an actor's CPU reservation (1 for an actor that reserves none)
    unless the variable is given."""
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def set_compute_threads(threads: int) -> int:
    """Use ``threads`` threads in this process for torch (intra-op) and faiss; returns it."""
    import torch

    threads = int(threads)
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    return threads
