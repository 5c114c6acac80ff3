"""Refresh policies: decide after each round whether to refresh the pre-computed features.

A refresh = fine-tune the backbone on the labelled set L + re-extract every pool feature
(ASVP.md, "When to refresh features"). Every policy is a small class with one method,
``decide(history, probe=None) -> Decision``, registered in :data:`REFRESH_POLICIES`::

    policy = REFRESH_POLICIES.create("score_drop", threshold=0.1)
    history.append(RoundState(round=r, n_labeled=len(L), scores=alignment_scores(...)))
    decision = policy.decide(history, probe=probe_fn if policy.requires_probe else None)
    history.mark_refreshed(decision.refresh, refreshed_scores=...)

``history[-1]`` is the round being decided; earlier rounds are complete. Every decision
carries the numbers it used in ``scores`` and says why in ``reason``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from asvp_ray.alignment.ped import ALIGNMENT_SCORES
from asvp_ray.core.checks import is_int, is_number
from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.core.registry import Registry

__all__ = [
    "REFRESH_POLICIES",
    "AtLabels",
    "Decision",
    "EveryRound",
    "History",
    "Never",
    "REFERENCES",
    "Reference",
    "Probe",
    "ProbeFn",
    "RefreshPolicy",
    "RoundState",
    "ScoreDrop",
]


@dataclass(frozen=True)
class Decision:
    """A refresh decision and why.

    Attributes:
        refresh: whether to refresh the features now.
        reason: which rule fired or blocked, with its numbers, for the run's log.
        scores: the numbers the decision used (scores, thresholds, label counts).
        reference: for score-based policies, the score compared against
            (:meth:`Reference.to_json`: mode, score, round, n_labeled), or None.
    """

    refresh: bool
    reason: str
    scores: Dict[str, float] = field(default_factory=dict)
    reference: Optional[Dict[str, object]] = None


@dataclass(frozen=True)
class RoundState:
    """One round after its labels arrived.

    Attributes:
        round: round index, 0-based.
        n_labeled: size of the labelled set after this round's labels arrived.
        scores: alignment scores (name -> value) of the current features on the labelled set.
        refreshed: whether this round ended with a refresh (False while it is being decided).
        refreshed_scores: the same scores measured on the new features right after the
            refresh, if the driver measured them; the baseline of ``score_drop``.
    """

    round: int
    n_labeled: int
    scores: Mapping[str, float] = field(default_factory=dict)
    refreshed: bool = False
    refreshed_scores: Optional[Mapping[str, float]] = None

    def __post_init__(self) -> None:
        if not is_int(self.round, minimum=0):
            raise BadInputError(f"RoundState.round must be an int >= 0, got {self.round!r}")
        if not is_int(self.n_labeled, minimum=0):
            raise BadInputError(
                f"RoundState.n_labeled must be an int >= 0, got {self.n_labeled!r} (round {self.round})"
            )
        object.__setattr__(self, "scores", dict(self.scores))
        if self.refreshed_scores is not None:
            object.__setattr__(self, "refreshed_scores", dict(self.refreshed_scores))


class History:
    """The rounds so far, oldest first; the last one is the round being decided.

    Args:
        rounds: initial rounds; round indices must increase and n_labeled must not shrink.

    Raises:
        BadInputError: rounds out of order or the labelled set shrinking.
    """

    def __init__(self, rounds: Iterable[RoundState] = ()) -> None:
        self._rounds: List[RoundState] = []
        for state in rounds:
            self.append(state)

    def append(self, state: RoundState) -> None:
        """Add the next round.

        Raises:
            BadInputError: not a RoundState, round not after the last, or fewer labels.
        """
        if not isinstance(state, RoundState):
            raise BadInputError(f"History holds RoundState objects, got {type(state).__name__}")
        if self._rounds:
            last = self._rounds[-1]
            if state.round <= last.round:
                raise BadInputError(
                    f"History: round {state.round} does not come after round {last.round}"
                )
            if state.n_labeled < last.n_labeled:
                raise BadInputError(
                    f"History: round {state.round} has {state.n_labeled} labels, fewer than "
                    f"round {last.round}'s {last.n_labeled}; the labelled set only grows"
                )
        self._rounds.append(state)

    def mark_refreshed(
        self, refreshed: bool = True, refreshed_scores: Optional[Mapping[str, float]] = None
    ) -> None:
        """Record the outcome of the current (last) round's decision.

        Args:
            refreshed: whether the round ended with a refresh.
            refreshed_scores: scores of the new features on the labelled set, if measured.
        """
        current = self.current
        self._rounds[-1] = replace(
            current, refreshed=bool(refreshed), refreshed_scores=refreshed_scores if refreshed else None
        )

    def __len__(self) -> int:
        return len(self._rounds)

    def __iter__(self) -> Iterator[RoundState]:
        return iter(self._rounds)

    def __getitem__(self, i: int) -> RoundState:
        return self._rounds[i]

    def __repr__(self) -> str:
        return f"History({self._rounds!r})"

    @property
    def current(self) -> RoundState:
        """The round being decided (the last one).

        Raises:
            BadInputError: the history is empty.
        """
        if not self._rounds:
            raise BadInputError(
                "History is empty; append this round's RoundState before deciding"
            )
        return self._rounds[-1]

    @property
    def previous(self) -> Optional[RoundState]:
        """The round before the current one, or None."""
        return self._rounds[-2] if len(self._rounds) >= 2 else None

    @property
    def num_refreshes(self) -> int:
        """How many rounds ended with a refresh."""
        return sum(s.refreshed for s in self._rounds)

    @property
    def last_refresh(self) -> Optional[RoundState]:
        """The latest round that ended with a refresh, or None."""
        for state in reversed(self._rounds):
            if state.refreshed:
                return state
        return None

    @property
    def last_refresh_round(self) -> Optional[int]:
        """Index of the latest refresh round, or None when never refreshed."""
        state = self.last_refresh
        return None if state is None else state.round

    @property
    def labels_at_last_refresh(self) -> Optional[int]:
        """n_labeled when the latest refresh happened, or None when never refreshed."""
        state = self.last_refresh
        return None if state is None else state.n_labeled

    def score_at_last_refresh(self, name: str) -> Optional[float]:
        """Score ``name`` of the refreshed features right after the latest refresh.

        That is the refresh round's ``refreshed_scores[name]`` when recorded, otherwise
        the first later round's score (the first measurement on the new features).

        Returns:
            The score, or None when never refreshed or not measured yet.
        """
        state = self.last_refresh
        if state is None:
            return None
        if state.refreshed_scores is not None and name in state.refreshed_scores:
            return float(state.refreshed_scores[name])
        after = [s for s in self._rounds if s.round > state.round and name in s.scores]
        return float(after[0].scores[name]) if after else None

    def measurements(self, name: str) -> List[Tuple[int, int, float, str]]:
        """Every measurement of score ``name`` on the current feature version, oldest first.

        The current version starts after the last refresh (its ``refreshed_scores``, then
        each later round's score), else at round 0. The current round is included.

        Returns:
            ``(round, n_labeled, score, what)`` tuples; ``what`` is ``"after refresh"`` or
            ``"round"``.
        """
        state = self.last_refresh
        out: List[Tuple[int, int, float, str]] = []
        start = -1
        if state is not None:
            start = state.round
            if state.refreshed_scores is not None and name in state.refreshed_scores:
                out.append((state.round, state.n_labeled, float(state.refreshed_scores[name]), "after refresh"))
        for s in self._rounds:
            if s.round > start and name in s.scores:
                out.append((s.round, s.n_labeled, float(s.scores[name]), "round"))
        return out

    def baseline(self, name: str) -> Tuple[float, int, str]:
        """The ``first`` reference: right after the last refresh, else the first round.

        Returns:
            ``(score, n_labeled, description)``; the description names its round.

        Raises:
            BadInputError: the baseline round lacks score ``name``.
        """
        ref = self.reference(name, "first")
        assert ref is not None  # "first" always has one, or raised
        return ref.score, ref.n_labeled, ref.description

    def reference(self, name: str, mode: str = "first", min_labels: int = 0) -> Optional["Reference"]:
        """The score a score-based policy compares the current one against.

        Args:
            name: the score.
            mode: ``first`` -- the first measurement on the current feature version (right
                after the last refresh, else round 0); ``best`` -- the highest measurement on
                the current version so far, this round included; ``min_labels`` -- the
                first measurement on the current version taken with at least ``min_labels``
                labels.
            min_labels: for ``min_labels``.

        Returns:
            A :class:`Reference`, or None for ``min_labels`` while no measurement on the
            current version had ``min_labels`` labels yet (no decision can be made).

        Raises:
            ConfigError: an unknown mode.
            BadInputError: the history is empty, or the measurement ``first`` needs lacks the
                score.
        """
        if mode not in REFERENCES:
            raise ConfigError(f"unknown score reference {mode!r}; use one of {', '.join(REFERENCES)}")
        self.current  # noqa: B018 -- raises the empty-history error
        found = self.measurements(name)
        state = self.last_refresh
        if not found:
            if state is not None:
                raise BadInputError(
                    f"History: no {name!r} score after the refresh at round {state.round}; "
                    f"pass refreshed_scores to mark_refreshed or record {name!r} in later rounds"
                )
            first = self._rounds[0]
            raise BadInputError(
                f"History: round {first.round} has no {name!r} score (it has "
                f"{', '.join(sorted(first.scores)) or 'none'}); compute it with alignment_scores"
            )
        version = "never refreshed" if state is None else f"features of the refresh at round {state.round}"
        if mode == "first":
            pick = found[0]
        elif mode == "best":
            pick = max(found, key=lambda m: m[2])  # the earliest of equal scores
        else:
            ok = [m for m in found if m[1] >= min_labels]
            if not ok:
                return None
            pick = ok[0]
        r, n, score, what = pick
        where = "after the refresh at round" if what == "after refresh" else "at round"
        desc = f"{mode} reference: {where} {r} ({n} labels; {version})"
        if state is None and mode == "first":
            desc = f"at round {r}, never refreshed"
        elif state is not None and mode == "first" and what == "after refresh":
            desc = f"after the refresh at round {r}"
        return Reference(mode=mode, score=score, round=r, n_labeled=n, description=desc)


REFERENCES = ("first", "best", "min_labels")
"""``refresh.reference``: what a score-based policy compares the current score against."""


@dataclass(frozen=True)
class Reference:
    """The score a decision compared against, recorded with the decision.

    Attributes:
        mode: ``first``, ``best`` or ``min_labels``.
        score: its value.
        round: the round it was measured in (after that round's refresh when it is the
            refreshed features' first score).
        n_labeled: labels when it was measured.
        description: for the decision's reason.
    """

    mode: str
    score: float
    round: int
    n_labeled: int
    description: str

    def to_json(self) -> Dict[str, object]:
        return {"mode": self.mode, "score": self.score, "round": self.round, "n_labeled": self.n_labeled}


ProbeFn = Callable[[History], Mapping[str, float]]
"""``probe(history) -> {score name: value}`` of briefly fine-tuned features on the labelled set."""


class RefreshPolicy:
    """Base class: one method, :meth:`decide`.

    Attributes:
        requires_probe: True when :meth:`decide` needs a ``probe`` callable, so the driver
            knows to supply one without asking which policy it holds.
    """

    name: str = ""
    requires_probe: bool = False

    def decide(self, history: History, probe: Optional[ProbeFn] = None) -> Decision:
        """Decide whether to refresh after the current round (``history[-1]``).

        Args:
            history: the rounds so far; the last one is being decided.
            probe: only for policies with ``requires_probe``; ignored by the others.

        Returns:
            A :class:`Decision`.
        """
        raise NotImplementedError


def _check_score_name(policy: str, score: str) -> None:
    if not isinstance(score, str) or score not in ALIGNMENT_SCORES:
        raise ConfigError(
            f"{policy}: score={score!r} is not an alignment score; "
            f"use one of {', '.join(ALIGNMENT_SCORES.names())}"
        )


def _check_number(policy: str, name: str, value: float, hint: str) -> float:
    if not is_number(value, minimum=0):
        raise ConfigError(f"{policy}: {name}={value!r} is invalid; {hint}")
    return float(value)


def _check_count(policy: str, name: str, value: Optional[int], allow_none: bool, hint: str) -> None:
    if value is None and allow_none:
        return
    if not is_int(value, minimum=0):
        raise ConfigError(f"{policy}: {name}={value!r} is invalid; {hint}")


def _current_score(history: History, name: str) -> float:
    current = history.current
    if name not in current.scores:
        raise BadInputError(
            f"round {current.round} has no {name!r} score (it has "
            f"{', '.join(sorted(current.scores)) or 'none'}); compute it with alignment_scores"
        )
    value = float(current.scores[name])
    if not math.isfinite(value):
        raise BadInputError(f"round {current.round}: {name!r} score is {value}, not a finite number")
    return value


def _cap_text(max_refreshes: Optional[int]) -> str:
    return "no cap" if max_refreshes is None else str(max_refreshes)


def _cap_value(max_refreshes: Optional[int]) -> float:
    return math.inf if max_refreshes is None else float(max_refreshes)


REFRESH_POLICIES: Registry[RefreshPolicy] = Registry("refresh policy")


@REFRESH_POLICIES.register("never")
@dataclass(frozen=True)
class Never(RefreshPolicy):
    """Never refresh: pre-trained features throughout (the ``svpp`` method)."""

    name = "never"

    def decide(self, history: History, probe: Optional[ProbeFn] = None) -> Decision:
        history.current  # noqa: B018 -- same empty-history error as every policy
        return Decision(False, "policy 'never': features are never refreshed", {})


@REFRESH_POLICIES.register("every_round")
@dataclass(frozen=True)
class EveryRound(RefreshPolicy):
    """Refresh after every round (what ``standard`` AL effectively pays for)."""

    name = "every_round"

    def decide(self, history: History, probe: Optional[ProbeFn] = None) -> Decision:
        current = history.current
        return Decision(
            True,
            f"policy 'every_round': refresh after round {current.round}",
            {"n_labeled": float(current.n_labeled)},
        )


@REFRESH_POLICIES.register("at_labels")
@dataclass(frozen=True)
class AtLabels(RefreshPolicy):
    """Refresh the first time the labelled set reaches or passes each threshold.

    The released ASVP code's behaviour (one hand-picked label count). A round that passes
    several thresholds at once refreshes once. Stateless: a threshold fires in the round
    where ``previous n_labeled < threshold <= n_labeled``.

    Args:
        at: label counts, positive ints; order and duplicates do not matter.

    Raises:
        ConfigError: empty, or a count that is not a positive int.
    """

    at: Tuple[int, ...] = ()
    name = "at_labels"

    def __post_init__(self) -> None:
        if isinstance(self.at, (str, bytes)) or not isinstance(self.at, Iterable):
            raise ConfigError(f"at_labels: at={self.at!r} must be a list of label counts, e.g. at=[20000]")
        values = tuple(self.at)
        if not values:
            raise ConfigError("at_labels: at=[] never fires; give label counts, e.g. at=[20000], or use policy 'never'")
        for v in values:
            if not is_int(v):
                raise ConfigError(f"at_labels: {v!r} in at={list(values)} must be a positive int label count")
        object.__setattr__(self, "at", tuple(sorted(set(values))))

    def decide(self, history: History, probe: Optional[ProbeFn] = None) -> Decision:
        current = history.current
        prev = history.previous
        prev_n = prev.n_labeled if prev is not None else 0
        crossed = [t for t in self.at if prev_n < t <= current.n_labeled]
        numbers = {"n_labeled": float(current.n_labeled), "previous_n_labeled": float(prev_n)}
        if crossed:
            numbers["threshold"] = float(crossed[0])
            return Decision(
                True,
                f"at_labels: n_labeled {current.n_labeled} reached threshold(s) "
                f"{', '.join(map(str, crossed))} (previous round had {prev_n})",
                numbers,
            )
        upcoming = [t for t in self.at if t > current.n_labeled]
        if upcoming:
            numbers["next_threshold"] = float(upcoming[0])
            reason = f"at_labels: n_labeled {current.n_labeled} below the next threshold {upcoming[0]}"
        else:
            reason = f"at_labels: all thresholds {list(self.at)} already passed (n_labeled {current.n_labeled})"
        return Decision(False, reason, numbers)


@REFRESH_POLICIES.register("score_drop")
@dataclass(frozen=True)
class ScoreDrop(RefreshPolicy):
    """Refresh when the alignment score fell by more than a threshold since the baseline.

    The reference (``reference``, see :meth:`History.reference`) is taken among the scores
    of the current feature version: ``first`` -- right after the last refresh, or round 0's
    when never refreshed; ``best`` -- the highest so far; ``min_labels`` -- the first one
    measured with at least ``reference_min_labels`` labels (no refresh before that). Checks,
    in order: a reference exists; the drop must exceed ``threshold``; fewer than
    ``max_refreshes`` refreshes so far; at least ``min_new_labels`` labels since the
    current feature version's first measurement (the last refresh, or round 0).

    Defaults (to be tuned by benchmark): ``threshold=0.05`` nats per sample of LogME, a
    few percent of its typical spread across backbones; ``min_new_labels=1`` so the same
    labelled set never pays for two refreshes; ``max_refreshes=2``, one more than the
    released code's single refresh, bounding the extra compute.

    Args:
        score: an :data:`ALIGNMENT_SCORES` name recorded in every round.
        threshold: refresh only on a drop strictly greater than this (>= 0).
        min_new_labels: labels that must have arrived since the baseline (>= 0).
        max_refreshes: refresh budget for the whole run; None = unlimited.
        reference: ``first``, ``best`` or ``min_labels`` (:data:`REFERENCES`).
        reference_min_labels: labels the ``min_labels`` reference needs (>= 0).

    Raises:
        ConfigError: an unknown score or reference, or a negative/non-finite parameter.
    """

    score: str = "logme"
    threshold: float = 0.05
    min_new_labels: int = 1
    max_refreshes: Optional[int] = 2
    reference: str = "first"
    reference_min_labels: int = 0
    name = "score_drop"

    def __post_init__(self) -> None:
        _check_score_name("score_drop", self.score)
        object.__setattr__(
            self, "threshold",
            _check_number("score_drop", "threshold", self.threshold,
                          "set a finite drop >= 0 in score units, e.g. threshold=0.05"),
        )
        _check_count("score_drop", "min_new_labels", self.min_new_labels, False,
                     "set an int >= 0, e.g. min_new_labels=1000")
        _check_count("score_drop", "max_refreshes", self.max_refreshes, True,
                     "set an int >= 0, or None for no cap")
        if self.reference not in REFERENCES:
            raise ConfigError(f"score_drop: reference={self.reference!r} is invalid; use one of "
                              f"{', '.join(REFERENCES)}")
        _check_count("score_drop", "reference_min_labels", self.reference_min_labels, False,
                     "set an int >= 0, e.g. reference_min_labels=500")

    def decide(self, history: History, probe: Optional[ProbeFn] = None) -> Decision:
        current = history.current
        now = _current_score(history, self.score)
        ref = history.reference(self.score, self.reference, self.reference_min_labels)
        done = history.num_refreshes
        if ref is None:
            return Decision(
                False,
                f"score_drop: no reference yet: the {self.reference} reference needs a {self.score} "
                f"measured with >= {self.reference_min_labels} labels on the current features "
                f"(now {current.n_labeled}); no refresh",
                {self.score: now, "n_labeled": float(current.n_labeled),
                 "reference_min_labels": float(self.reference_min_labels), "refreshes": float(done),
                 "max_refreshes": _cap_value(self.max_refreshes)},
                None,
            )
        base, where = ref.score, ref.description
        drop = base - now
        start = history.last_refresh or history[0]  # where the current feature version began
        new_labels = current.n_labeled - start.n_labeled
        numbers = {
            self.score: now,
            f"{self.score}_baseline": base,
            "reference_n_labeled": float(ref.n_labeled),
            "drop": drop,
            "threshold": self.threshold,
            "new_labels": float(new_labels),
            "min_new_labels": float(self.min_new_labels),
            "refreshes": float(done),
            "max_refreshes": _cap_value(self.max_refreshes),
        }
        head = f"score_drop: {self.score} {now:.4f} vs {base:.4f} {where}: drop {drop:.4f}"
        refj = ref.to_json()
        if not drop > self.threshold:
            return Decision(False, f"{head} <= threshold {self.threshold:.4f}; no refresh", numbers, refj)
        if self.max_refreshes is not None and done >= self.max_refreshes:
            return Decision(
                False,
                f"{head} > threshold {self.threshold:.4f}, but blocked by max_refreshes: "
                f"{done} of {self.max_refreshes} refreshes used",
                numbers,
                refj,
            )
        if new_labels < self.min_new_labels:
            return Decision(
                False,
                f"{head} > threshold {self.threshold:.4f}, but blocked by min_new_labels: "
                f"{new_labels} new labels < {self.min_new_labels}",
                numbers,
                refj,
            )
        return Decision(
            True,
            f"{head} > threshold {self.threshold:.4f}; {new_labels} new labels >= "
            f"{self.min_new_labels}; refresh {done + 1} of {_cap_text(self.max_refreshes)}",
            numbers,
            refj,
        )


@REFRESH_POLICIES.register("probe")
@dataclass(frozen=True)
class Probe(RefreshPolicy):
    """Refresh when briefly fine-tuned features score better than the current ones.

    The caller supplies ``probe(history)``: a cheap fine-tune on L, features extracted
    for L only, scored with the same alignment scores. The probe is not run once the
    refresh budget is spent.

    Defaults (to be tuned by benchmark): ``margin=0.05`` score units, so noise between
    two feature sets on the same labels does not trigger a full pool re-extraction;
    ``max_refreshes=2`` as for ``score_drop``.

    Args:
        score: an :data:`ALIGNMENT_SCORES` name.
        margin: refresh only when the probe beats the current score by more than this.
        max_refreshes: refresh budget for the whole run; None = unlimited.

    Raises:
        ConfigError: an unknown score or a negative/non-finite parameter.
    """

    score: str = "logme"
    margin: float = 0.05
    max_refreshes: Optional[int] = 2
    name = "probe"
    requires_probe = True

    def __post_init__(self) -> None:
        _check_score_name("probe", self.score)
        object.__setattr__(
            self, "margin",
            _check_number("probe", "margin", self.margin,
                          "set a finite gain >= 0 in score units, e.g. margin=0.05"),
        )
        _check_count("probe", "max_refreshes", self.max_refreshes, True,
                     "set an int >= 0, or None for no cap")

    def decide(self, history: History, probe: Optional[ProbeFn] = None) -> Decision:
        if probe is None or not callable(probe):
            raise ConfigError(
                "refresh policy 'probe' needs a probe callable: call decide(history, probe=fn) "
                "where fn(history) returns the fine-tuned features' scores on the labelled set"
            )
        current = history.current
        now = _current_score(history, self.score)
        done = history.num_refreshes
        numbers = {
            self.score: now,
            "margin": self.margin,
            "refreshes": float(done),
            "max_refreshes": _cap_value(self.max_refreshes),
        }
        if self.max_refreshes is not None and done >= self.max_refreshes:
            return Decision(
                False,
                f"probe: blocked by max_refreshes: {done} of {self.max_refreshes} refreshes "
                "used; probe not run",
                numbers,
            )
        result = probe(history)
        if not isinstance(result, Mapping) or self.score not in result:
            raise BadInputError(
                f"probe: the probe callable must return a mapping with a {self.score!r} "
                f"score, got {result!r}"
            )
        probed = float(result[self.score])
        if not math.isfinite(probed):
            raise BadInputError(f"probe: probed {self.score!r} score is {probed}, not a finite number")
        gain = probed - now
        numbers.update({f"{self.score}_probe": probed, "gain": gain})
        head = (
            f"probe: fine-tuned {self.score} {probed:.4f} vs current {now:.4f} "
            f"(round {current.round}): gain {gain:.4f}"
        )
        refj = {"mode": "current", "score": now, "round": current.round, "n_labeled": current.n_labeled}
        if gain > self.margin:
            return Decision(
                True,
                f"{head} > margin {self.margin:.4f}; refresh {done + 1} of {_cap_text(self.max_refreshes)}",
                numbers,
                refj,
            )
        return Decision(False, f"{head} <= margin {self.margin:.4f}; no refresh", numbers, refj)
