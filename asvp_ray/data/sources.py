"""Pool sources: where images enter. ``SOURCES`` maps the config's ``data.pool.kind`` to a
:class:`~asvp_ray.data.base.PoolSource` class, each built by its ``from_config(cfg, classes)``:

- ``fashion_mnist``: :class:`~asvp_ray.data.fashion_mnist.FashionMNISTSource` (IDX files);
- ``image_folder``: :class:`~asvp_ray.data.files.ImageFolderSource`;
- ``manifest``: :class:`~asvp_ray.data.files.ManifestSource` (ids, paths and labels in a file);
- ``embeddings``: :class:`~asvp_ray.data.embeddings.EmbeddingsSource` (bring your own features);
- ``webdataset``: :class:`~asvp_ray.data.webdataset.WebDatasetSource` (tar shards, indexed);
- ``parquet_images``: :class:`~asvp_ray.data.parquet_images.ParquetImagesSource` (Parquet with image bytes, indexed).

A new kind registers itself with ``@SOURCES.register("name")`` on its class.
"""
from __future__ import annotations

from typing import List, Optional

from asvp_ray.core.registry import Registry
from asvp_ray.data.base import PoolSource
from asvp_ray.data.embeddings import EmbeddingsSource
from asvp_ray.data.fashion_mnist import FashionMNISTSource
from asvp_ray.data.files import ImageFolderSource, ManifestSource
from asvp_ray.data.indexed import IndexedSource
from asvp_ray.data.parquet_images import ParquetImagesSource
from asvp_ray.data.webdataset import WebDatasetSource

SOURCES: Registry[PoolSource] = Registry("pool source")
for _cls in (FashionMNISTSource, ImageFolderSource, ManifestSource, EmbeddingsSource, WebDatasetSource,
             ParquetImagesSource):
    SOURCES.register(_cls.kind)(_cls)


def build_source(cfg, classes: Optional[List[str]] = None, index_dir=None) -> PoolSource:
    """A ``PoolSource`` from a ``SourceConfig``: ``SOURCES[cfg.kind].from_config(cfg, classes)``.
    Indexed kinds (webdataset, parquet_images) keep their index in ``index_dir`` (a run's
    ``index/``): built once, loaded on resume.

    Raises:
        ConfigError: an unknown kind, or a key the source kind needs is missing.
    """
    cls = SOURCES.get(cfg.kind)
    if issubclass(cls, IndexedSource):
        return cls.from_config(cfg, classes, index_dir=index_dir)
    return cls.from_config(cfg, classes)
