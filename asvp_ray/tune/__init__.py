"""Ray Tune studies whose trials are asvp-ray runs: ``asvp-ray tune CONFIG --space SPACE --out DIR``.

``space`` reads a YAML search space into a Tune ``param_space`` (validated against ``Config``);
``study`` runs the Tuner (features extracted once into a shared cache, ASHA on the per-round
proxy test accuracy, resume with ``Tuner.restore``) and writes the results table, the best
config and a plot of the learning curves; ``resources`` sizes what one trial needs (its actor plus
its Ray Train workers or extraction actors) and how many trials fit at once, and refuses a study
whose single trial cannot fit the cluster before anything starts.
"""
from asvp_ray.tune.space import DISTRIBUTIONS, Param, SearchSpace, parse_space
from asvp_ray.tune.study import StudyResult, check_settings, run_study

__all__ = ["DISTRIBUTIONS", "Param", "SearchSpace", "StudyResult", "check_settings", "parse_space", "run_study"]
