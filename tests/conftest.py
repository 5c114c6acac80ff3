"""Shared fixtures: one local Ray instance per test session, tiny seeded data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "smoke.yaml"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the whole test session (2 CPUs, like the CI machine)."""
    import ray

    from asvp_ray.ray_utils import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def write_images(folder: Path, n: int, size=(20, 24), seed: int = 0, mode: str = "RGB", ext: str = "png"):
    """Write ``n`` small random images; returns their paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    r = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        img = Image.fromarray(r.integers(0, 255, shape, dtype=np.uint8), mode=mode)
        p = folder / f"img{i:03d}.{ext}"
        img.save(p)
        paths.append(p)
    return paths


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here; run "
                                   "`python -m pytest -m gpu tests/test_gpu.py` on a machine with one")
    for item in gpu_items:
        item.add_marker(skip)
