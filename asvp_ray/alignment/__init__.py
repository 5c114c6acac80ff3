"""Alignment scores (LogME, LogME-PED) and the policies that decide when to refresh features.

Public API::

    logme(features, labels, num_classes=None) -> float
    ped_move(features, labels, reference=None, dt=0.1, nsigma=0.6, ...) -> moved features
    logme_ped(features, labels, reference=None, **ped_kwargs) -> float
    alignment_scores(features, labels, reference=None, scores=("logme", "logme_ped")) -> dict
    REFRESH_POLICIES.create("score_drop", threshold=0.05, reference="best").decide(history) -> Decision
"""
from asvp_ray.alignment.logme import logme
from asvp_ray.alignment.ped import (
    ALIGNMENT_SCORES,
    PedResult,
    alignment_scores,
    logme_ped,
    ped_move,
    ped_trace,
)
from asvp_ray.alignment.policies import (
    REFERENCES,
    REFRESH_POLICIES,
    AtLabels,
    Decision,
    EveryRound,
    History,
    Never,
    Probe,
    ProbeFn,
    Reference,
    RefreshPolicy,
    RoundState,
    ScoreDrop,
)

__all__ = [
    "ALIGNMENT_SCORES",
    "REFERENCES",
    "REFRESH_POLICIES",
    "AtLabels",
    "Decision",
    "EveryRound",
    "History",
    "Never",
    "PedResult",
    "Probe",
    "ProbeFn",
    "Reference",
    "RefreshPolicy",
    "RoundState",
    "ScoreDrop",
    "alignment_scores",
    "logme",
    "logme_ped",
    "ped_move",
    "ped_trace",
]
