"""The MLP proxy of selection-via-proxy: a small classifier trained on pool features.

The reference recipe (Wen et al., TMLR 2024): Linear(D, H) -> BatchNorm1d(H) -> ReLU ->
Linear(H, C) with H = D, re-initialised every round, SGD (lr 0.1, momentum 0.9, Nesterov,
no weight decay), cross-entropy, batch 2048, 50 epochs, lr multiplied each step by
max(0, cos(pi * 7/16 * progress)).

Scoring a million-row pool is the hot path: after ``fit`` the BatchNorm (and, with
``normalize="standardize"``, the input standardisation) is folded into the first Linear
layer, so evaluating a chunk is one ``addmm``, an in-place ReLU and a small second
``addmm``, written into preallocated buffers.

Crossing processes: a fitted proxy travels to Ray actors (pool shards), Tune trials and
checkpoints by pickling. Its state is always pickled with CPU tensors, and a receiver scores on
the device its ``device`` setting resolves to *there* (``auto``: CUDA when that process sees a
GPU and, inside Ray, reserved one); a proxy fitted on CUDA thus works in a CPU-only shard actor.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import nn

from asvp_ray.core.checks import is_int, is_number
from asvp_ray.core.errors import BadInputError, ConfigError

NORMALIZE_CHOICES = ("none", "l2", "standardize")
STD_FLOOR = 1e-6
L2_EPS = 1e-12
# Fraction of a half cosine period swept by the schedule: the reference's 7/16.
COSINE_FRACTION = 7.0 / 16.0

log = logging.getLogger(__name__)
_LOGGED: set = set()  # device choices already logged by this process


def _log_once(level: int, msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.log(level, msg)


def cosine_lr_factor(step: int, total_steps: int) -> float:
    """The reference lr multiplier at an optimisation step.

    Args:
        step: optimisation step, counted from 0.
        total_steps: number of optimisation steps of the whole fit.

    Returns:
        ``max(0, cos(pi * 7/16 * step / total_steps))``.
    """
    if total_steps <= 0:
        return 1.0
    return max(0.0, math.cos(math.pi * COSINE_FRACTION * step / total_steps))


def batch_bounds(n: int, batch_size: int, merge_singleton: bool = True) -> List[Tuple[int, int]]:
    """Start/stop offsets of the mini-batches of one epoch.

    BatchNorm1d cannot train on a batch of one sample, so a trailing batch of size 1 is
    merged into the batch before it (every sample is still seen every epoch).

    Args:
        n: number of training samples.
        batch_size: nominal batch size.
        merge_singleton: merge a trailing batch of size 1 into the previous batch.

    Returns:
        A list of ``(start, stop)`` pairs covering ``range(n)``.
    """
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if merge_singleton and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds


def _resolve_device(device: str) -> torch.device:
    from asvp_ray.runtime.device import usable_cuda

    if device == "auto":
        ok, why = usable_cuda()
        if ok:
            _log_once(logging.INFO, f"MLPProxy device=auto: cuda ({torch.cuda.get_device_name()})")
            return torch.device("cuda")
        _log_once(logging.INFO, f"MLPProxy device=auto: cpu ({why})")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"MLPProxy device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0' or 'auto'"
        ) from exc
    if dev.type == "cuda":
        ok, why = usable_cuda()
        if not ok:
            raise ConfigError(
                f"MLPProxy device={device!r} but {why}; use device='auto' or 'cpu'"
                + (" or reserve a GPU (num_gpus=1)" if torch.cuda.is_available() else "")
            )
    return dev


def _receiver_device(device: str) -> torch.device:
    """Where an unpickled proxy scores: ``device`` resolved in this process, falling back to the
    CPU (with a warning) when it names CUDA and this process has none (a CPU-only Ray actor)."""
    try:
        return _resolve_device(device)
    except ConfigError:
        _log_once(logging.WARNING, f"MLPProxy fitted with device={device!r} scores on the CPU in this process, "
                                   "which sees no CUDA device or reserved none")
        return torch.device("cpu")


def _column_mean_std(X: np.ndarray, chunk_rows: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation in float64, in row chunks: no float64
    copy of the whole matrix (at 20,000 x 512 labelled rows that copy was 82 MB of the driver's peak)."""
    n = len(X)
    total = np.zeros(X.shape[1], dtype=np.float64)
    for s in range(0, n, chunk_rows):
        total += X[s:s + chunk_rows].sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros(X.shape[1], dtype=np.float64)
    for s in range(0, n, chunk_rows):
        d = X[s:s + chunk_rows].astype(np.float64) - mean
        sq += np.einsum("ij,ij->j", d, d)
    return mean, np.sqrt(sq / max(n, 1))


class MLPProxy(BaseEstimator):
    """Reference MLP (or linear) proxy classifier on pre-computed features.

    ``__init__`` only stores its arguments; they are validated in :meth:`fit`. Each ``fit``
    re-initialises the network from ``seed``, so two fits with the same seed and data give
    identical weights (on the same device and thread count).

    Args:
        hidden: hidden width H; None means the input width D (the reference).
        linear: a single Linear(D, C) layer instead of the MLP.
        epochs: training epochs.
        batch_size: mini-batch size.
        lr: base learning rate of SGD.
        momentum: SGD momentum; Nesterov is used when it is positive.
        weight_decay: L2 weight decay of SGD.
        normalize: input normalisation: "none", "l2" (unit-length rows) or "standardize"
            (training mean and standard deviation, std floored at 1e-6).
        device: torch device for training and scoring; "auto" picks CUDA when available (and
            logs the choice). Resolved again in a process that unpickles the proxy.
        seed: seed of the weight initialisation and of the per-epoch shuffles.
        chunk_size: rows evaluated at once by the scoring methods; bounds their memory.

    Attributes:
        num_classes_: number of classes C.
        classes_: ``np.arange(C)``.
        n_features_in_: input width D.
        hidden_: hidden width H used (D for the linear proxy).
        module_: the trained ``torch.nn.Module``, in eval mode (on the CPU after unpickling).
        device_: the device it scores on (after unpickling: resolved in the receiving process).
        mean_, scale_: standardisation statistics (float32, (D,)), None unless standardising.
        n_steps_: optimisation steps taken.
        lr_history_: the learning rate of each optimisation step, float64 (n_steps_,).
        loss_history_: the mean training loss of each epoch, float64 (epochs,).
    """

    def __init__(
        self,
        hidden: Optional[int] = None,
        linear: bool = False,
        epochs: int = 50,
        batch_size: int = 2048,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        normalize: str = "none",
        device: str = "cpu",
        seed: int = 0,
        chunk_size: int = 65536,
    ):
        self.hidden = hidden
        self.linear = linear
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.normalize = normalize
        self.device = device
        self.seed = seed
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ validation
    def _check_params(self) -> None:
        def pos_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not is_int(value):
                raise ConfigError(f"MLPProxy {name}={value!r} must be a positive integer")

        pos_int("hidden", self.hidden, allow_none=True)
        pos_int("epochs", self.epochs)
        pos_int("batch_size", self.batch_size)
        pos_int("chunk_size", self.chunk_size)
        if not is_int(self.seed, minimum=None):
            raise ConfigError(f"MLPProxy seed={self.seed!r} must be an integer")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not is_number(value):
                raise ConfigError(f"MLPProxy {name}={value!r} must be a finite number")
        if self.lr <= 0:
            raise ConfigError(f"MLPProxy lr={self.lr!r} must be positive")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ConfigError(
                f"MLPProxy momentum={self.momentum!r}, weight_decay={self.weight_decay!r} must be >= 0"
            )
        if self.normalize not in NORMALIZE_CHOICES:
            raise ConfigError(
                f"MLPProxy normalize={self.normalize!r} is not one of {', '.join(NORMALIZE_CHOICES)}"
            )

    @staticmethod
    def _check_fit_inputs(X, y, num_classes) -> Tuple[np.ndarray, np.ndarray, int]:
        X = np.asarray(X)
        y = np.asarray(y)
        if X.ndim != 2:
            raise BadInputError(f"MLPProxy.fit: X must be 2-D (N, D), got shape {X.shape}")
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise BadInputError(f"MLPProxy.fit: X must be numeric, got dtype {X.dtype}")
        if y.ndim != 1:
            raise BadInputError(f"MLPProxy.fit: y must be 1-D (N,), got shape {y.shape}")
        if len(y) != len(X):
            raise BadInputError(
                f"MLPProxy.fit: X has {len(X)} rows but y has {len(y)} labels; they must match"
            )
        if len(X) == 0:
            raise BadInputError("MLPProxy.fit: X is empty; label at least 2 samples before fitting")
        if X.shape[1] == 0:
            raise BadInputError("MLPProxy.fit: X has 0 feature columns")
        if not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"MLPProxy.fit: y must hold integer class indices, got dtype {y.dtype}")
        X = np.ascontiguousarray(X, dtype=np.float32)
        if not all(np.isfinite(X[s:s + 8192]).all() for s in range(0, len(X), 8192)):  # no (N, D) mask
            finite = np.isfinite(X)
            row, col = np.argwhere(~finite)[0]
            raise BadInputError(
                f"MLPProxy.fit: X has {int((~finite).sum())} NaN/inf values (first at row {row}, "
                f"column {col}); clean or re-extract those features"
            )
        if num_classes is None:
            num_classes = max(int(y.max()) + 1, 1)
        if not is_int(num_classes):
            raise BadInputError(f"MLPProxy.fit: num_classes={num_classes!r} must be a positive integer")
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BadInputError(
                f"MLPProxy.fit: y[{i}] = {int(y[i])} is outside [0, {num_classes}) "
                f"({int(bad.sum())} labels out of range); fix the labels or pass num_classes"
            )
        return X, y.astype(np.int64, copy=False), int(num_classes)

    def _check_X(self, X, where: str) -> np.ndarray:
        if not hasattr(self, "module_"):
            raise NotFittedError(f"MLPProxy.{where}: this proxy is not fitted yet; call fit(X, y) first")
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise BadInputError(
                f"MLPProxy.{where}: X must have shape (N, {self.n_features_in_}) like the "
                f"training features, got {X.shape}"
            )
        if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
            raise BadInputError(f"MLPProxy.{where}: X must be numeric, got dtype {X.dtype}")
        return X

    # ------------------------------------------------------------------ training
    def _build(self, D: int, H: int, C: int, gen: torch.Generator) -> nn.Module:
        # Build under a forked RNG (so fitting never disturbs the caller's global torch RNG)
        # and re-initialise every parameter from the seeded generator, like nn.Linear does.
        with torch.random.fork_rng(devices=[]):
            if self.linear:
                net = nn.Sequential(nn.Linear(D, C))
            else:
                net = nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.ReLU(inplace=True), nn.Linear(H, C))
        with torch.no_grad():
            for layer in net:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
                    bound = 1.0 / math.sqrt(layer.in_features)
                    nn.init.uniform_(layer.bias, -bound, bound, generator=gen)
        return net

    def _normalize_train(self, X: torch.Tensor) -> torch.Tensor:
        if self.normalize == "l2":
            return X / X.norm(dim=1, keepdim=True).clamp_min(L2_EPS)
        if self.normalize == "standardize":
            mean = torch.from_numpy(self.mean_).to(X.device)
            scale = torch.from_numpy(self.scale_).to(X.device)
            return (X - mean).div_(scale)  # one new matrix, not two
        return X

    def fit(self, X, y, num_classes: Optional[int] = None) -> "MLPProxy":
        """Train a freshly initialised proxy on labelled features.

        Args:
            X: features, float (N, D).
            y: class indices, integer (N,), in ``[0, num_classes)``.
            num_classes: number of classes C; None means ``max(y) + 1``.

        Returns:
            self.

        Raises:
            ConfigError: a constructor argument is invalid.
            BadInputError: X has NaN/inf, shapes disagree, a label is out of range, or the
                MLP gets a single sample (BatchNorm needs two).
        """
        self._check_params()
        X, y, C = self._check_fit_inputs(X, y, num_classes)
        N, D = X.shape
        if N < 2 and not self.linear:
            raise BadInputError(
                "MLPProxy.fit: the MLP proxy needs at least 2 labelled samples (BatchNorm); "
                "label more samples or use linear=True"
            )
        H = D if self.linear else int(self.hidden or D)
        dev = _resolve_device(self.device)

        if self.normalize == "standardize":
            mean, std = _column_mean_std(X)
            self.mean_ = mean.astype(np.float32)
            self.scale_ = np.maximum(std, STD_FLOOR).astype(np.float32)
        else:
            self.mean_ = None
            self.scale_ = None

        gen = torch.Generator().manual_seed(int(self.seed))
        net = self._build(D, H, C, gen).to(dev)
        Xt = torch.from_numpy(X).to(dev)
        if self.normalize == "standardize":  # per batch below: no normalised copy of the whole matrix
            mean_t = torch.from_numpy(self.mean_).to(dev)
            scale_t = torch.from_numpy(self.scale_).to(dev)
        else:
            Xt = self._normalize_train(Xt)
        yt = torch.from_numpy(y).to(dev)

        opt = torch.optim.SGD(
            net.parameters(),
            lr=float(self.lr),
            momentum=float(self.momentum),
            nesterov=self.momentum > 0,
            weight_decay=float(self.weight_decay),
        )
        bounds = batch_bounds(N, int(self.batch_size), merge_singleton=not self.linear)
        total = int(self.epochs) * len(bounds)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_lr_factor(step, total))

        lrs = np.empty(total, dtype=np.float64)
        losses = np.empty(int(self.epochs), dtype=np.float64)
        step = 0
        net.train()
        for epoch in range(int(self.epochs)):
            perm = torch.randperm(N, generator=gen).to(dev)
            epoch_loss = torch.zeros((), device=dev)
            for start, stop in bounds:
                idx = perm[start:stop]
                xb = Xt[idx]
                if self.normalize == "standardize":
                    xb = xb.sub_(mean_t).div_(scale_t)
                loss = F.cross_entropy(net(xb), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lrs[step] = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                step += 1
                epoch_loss += loss.detach() * (stop - start)
            losses[epoch] = float(epoch_loss) / N
        net.eval()

        self.module_ = net
        self.num_classes_ = C
        self.classes_ = np.arange(C)
        self.n_features_in_ = D
        self.hidden_ = H
        self.n_steps_ = total
        self.lr_history_ = lrs
        self.loss_history_ = losses
        self.device_ = dev
        self._scoring_params_ = self._fold(net, dev)
        self.__dict__.pop("fitted_device_", None)
        self._placed_for_ = self.device
        return self

    def _fold(self, net: nn.Module, dev: torch.device) -> Tuple[torch.Tensor, ...]:
        """Fold eval-mode BatchNorm and standardisation into the first Linear layer.

        Returns ``(W1, b1, W2, b2)`` float32 on ``dev`` such that, for normalised-or-raw
        input x (raw when standardising, l2-scaled otherwise), the MLP's logits are
        ``relu(x @ W1.T + b1) @ W2.T + b2`` (``W2``/``b2`` are None for the linear proxy,
        whose logits are ``x @ W1.T + b1``). Computed in float64.
        """
        with torch.no_grad():
            lin1 = net[0]
            W1 = lin1.weight.detach().double().cpu()
            b1 = lin1.bias.detach().double().cpu()
            if not self.linear:
                bn = net[1]
                s = bn.weight.detach().double().cpu() / torch.sqrt(
                    bn.running_var.detach().double().cpu() + bn.eps
                )
                W1 = W1 * s[:, None]
                b1 = (b1 - bn.running_mean.detach().double().cpu()) * s + bn.bias.detach().double().cpu()
            if self.normalize == "standardize":
                W1 = W1 / torch.from_numpy(self.scale_).double()[None, :]
                b1 = b1 - W1 @ torch.from_numpy(self.mean_).double()
            params = [W1.float().contiguous().to(dev), b1.float().contiguous().to(dev)]
            if self.linear:
                params += [None, None]
            else:
                lin2 = net[3]
                params += [lin2.weight.detach().float().contiguous().clone(), lin2.bias.detach().float().clone()]
        return tuple(params)

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        """The state with every tensor on the CPU (a CUDA tensor would not unpickle in a process
        without CUDA) and no device object; the receiver resolves its own device on use."""
        state = dict(super().__getstate__())  # a copy: the live object keeps its device
        if "module_" in state:
            module = state["module_"]
            if any(t.device.type != "cpu" for t in list(module.parameters()) + list(module.buffers())):
                module = copy.deepcopy(module).cpu()
            state["module_"] = module
        if state.get("_scoring_params_") is not None:
            state["_scoring_params_"] = tuple(None if t is None else t.detach().cpu()
                                              for t in state["_scoring_params_"])
        if "device_" in state:
            state["fitted_device_"] = str(state.pop("device_"))
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "fitted_device_" in self.__dict__:
            self.device_ = torch.device("cpu")  # where the tensors are now; moved on first use

    def _ensure_device(self) -> None:
        """Move the scoring parameters to the device ``device`` resolves to in this process, when
        they are elsewhere (an unpickled proxy, or ``set_params(device=...)`` after fitting)."""
        if "fitted_device_" not in self.__dict__ and getattr(self, "_placed_for_", self.device) == self.device:
            return
        target = _receiver_device(self.device)
        if target != self.device_:
            self._scoring_params_ = tuple(None if t is None else t.to(target) for t in self._scoring_params_)
            self.module_ = self.module_.to(target)
            self.device_ = target
        self.__dict__.pop("fitted_device_", None)
        self._placed_for_ = self.device

    # ------------------------------------------------------------------ scoring
    def _chunks(self, X: np.ndarray) -> Iterator[Tuple[int, int, torch.Tensor]]:
        dev = self.device_
        cs = int(self.chunk_size)
        with warnings.catch_warnings():
            # Read-only (memory-mapped) feature files: torch warns, but chunks are never written.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for s in range(0, len(X), cs):
                xc = X[s : s + cs]
                if xc.dtype != np.float32 or not xc.flags.c_contiguous:
                    xc = np.ascontiguousarray(xc, dtype=np.float32)
                xt = torch.from_numpy(xc)
                if dev.type != "cpu":
                    xt = xt.to(dev, non_blocking=True)
                yield s, s + len(xc), xt

    def _forward(
        self, X: np.ndarray, want_hidden: bool, want_proba: bool
    ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        self._ensure_device()
        N = len(X)
        C = self.num_classes_
        W1, b1, W2, b2 = self._scoring_params_
        on_cpu = self.device_.type == "cpu"
        l2 = self.normalize == "l2"
        hidden = np.empty((N, self.hidden_), dtype=np.float32) if want_hidden else None
        probs = np.empty((N, C), dtype=np.float32) if want_proba else None
        hidden_t = torch.from_numpy(hidden) if want_hidden else None
        probs_t = torch.from_numpy(probs) if want_proba else None
        m_max = min(int(self.chunk_size), N)
        with torch.inference_mode():
            hbuf = None
            if not self.linear and N > 0 and not (want_hidden and on_cpu):
                hbuf = torch.empty((m_max, self.hidden_), dtype=torch.float32, device=self.device_)
            for s, e, xt in self._chunks(X):
                m = e - s
                inv_norm = None
                if l2:
                    inv_norm = torch.linalg.vector_norm(xt, dim=1, keepdim=True).clamp_min_(L2_EPS).reciprocal_()
                if self.linear:
                    if want_proba:
                        if l2:
                            logits = torch.mm(xt, W1.T).mul_(inv_norm).add_(b1)
                        else:
                            logits = torch.addmm(b1, xt, W1.T)
                    if want_hidden:
                        if l2:
                            h = xt * inv_norm
                        elif self.normalize == "standardize":
                            mean = torch.from_numpy(self.mean_).to(xt.device)
                            scale = torch.from_numpy(self.scale_).to(xt.device)
                            h = (xt - mean) / scale
                        else:
                            h = xt
                        hidden_t[s:e].copy_(h)
                else:
                    # Write activations straight into the output when it lives on this device.
                    h = hidden_t[s:e] if (want_hidden and on_cpu) else hbuf[:m]
                    if l2:
                        torch.mm(xt, W1.T, out=h)
                        h.mul_(inv_norm).add_(b1)
                    else:
                        torch.addmm(b1, xt, W1.T, out=h)
                    h.clamp_(min=0.0)
                    if want_hidden and not on_cpu:
                        hidden_t[s:e].copy_(h)
                    if want_proba:
                        logits = torch.addmm(b2, h, W2.T)
                if want_proba:
                    p = torch.softmax(logits, dim=1)
                    if not bool(torch.isfinite(p).all()):
                        bad = int(torch.nonzero(~torch.isfinite(p).all(dim=1))[0, 0]) + s
                        raise BadInputError(
                            f"MLPProxy: non-finite class probabilities at row {bad}; X probably "
                            f"holds NaN/inf there; clean or re-extract those features"
                        )
                    probs_t[s:e].copy_(p)
        return hidden, probs

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, evaluated in chunks of ``chunk_size`` rows.

        Args:
            X: features, float (N, D); float32 C-contiguous input is used without a copy.

        Returns:
            float32 (N, C) softmax probabilities.

        Raises:
            NotFittedError: called before ``fit``.
            BadInputError: X has the wrong width, or NaN/inf makes a row's scores non-finite.
        """
        X = self._check_X(X, "predict_proba")
        return self._forward(X, want_hidden=False, want_proba=True)[1]

    def predict(self, X) -> np.ndarray:
        """Most probable class, int64 (N,)."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def score(self, X, y) -> float:
        """Accuracy of :meth:`predict` against integer labels y (N,)."""
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise BadInputError(f"MLPProxy.score: y must have shape ({len(X)},), got {y.shape}")
        return float(np.mean(self.predict(X) == y))

    def hidden_activations(self, X) -> np.ndarray:
        """Post-ReLU hidden activations (the normalised input for the linear proxy).

        Args:
            X: features, float (N, D).

        Returns:
            float32 (N, H).
        """
        X = self._check_X(X, "hidden_activations")
        return self._forward(X, want_hidden=True, want_proba=False)[0]

    def embed_and_proba(self, X) -> Tuple[np.ndarray, np.ndarray]:
        """Hidden activations and class probabilities in one pass.

        Args:
            X: features, float (N, D).

        Returns:
            ``(hidden, probs)``: float32 (N, H) and float32 (N, C).
        """
        X = self._check_X(X, "embed_and_proba")
        return self._forward(X, want_hidden=True, want_proba=True)
