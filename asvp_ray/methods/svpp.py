"""SVPP (Coleman et al.): fixed pre-trained features, a proxy scores the pool, FT final model."""
from __future__ import annotations

from asvp_ray.methods.base import METHODS, Method


@METHODS.register("svpp")
class SVPP(Method):
    """Selection via proxy on features that never change: every hook is the base behaviour."""

    name = "svpp"

    @classmethod
    def finetunes(cls, cfg):
        return None

    @classmethod
    def extracts(cls, cfg):
        return None
