"""Active-learning methods behind a registry: ``METHODS.create("asvp", ctx=driver)`` (``ctx``: a
:class:`~asvp_ray.methods.context.RoundContext`).

Adding a method: one new module here with a ``@METHODS.register("name")`` subclass of
:class:`~asvp_ray.methods.base.Method`, and its import below.
"""
from asvp_ray.methods import asvp, standard, svpp  # noqa: F401  (register asvp, standard, svpp)
from asvp_ray.methods.base import METHODS, Method
from asvp_ray.methods.context import RoundContext

__all__ = ["METHODS", "Method", "RoundContext"]
