"""Active-learning methods behind a registry: ``METHODS.create("asvp", driver=d)``.

Adding a method: one new module here with a ``@METHODS.register("name")`` subclass of
:class:`~asvp_ray.methods.base.Method`, and its import below.
"""
from asvp_ray.methods import asvp, standard, svpp  # noqa: F401  (register asvp, standard, svpp)
from asvp_ray.methods.base import METHODS, Method

__all__ = ["METHODS", "Method"]
