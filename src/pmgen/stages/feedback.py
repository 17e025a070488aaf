"""Each user's own balance: a posterior over α learned from feedback, and the weights worth generating.

PMG keeps the candidate maximizing ``z(α) = α·log d_p + (1−α)·log d_t`` with one α for everybody.
Here every user has a posterior over α on a grid (:data:`GRID`), starting from a prior centred on
the preset's α, updated by a choice likelihood on the candidates the user was shown (each with its
selector scores ``d_t``, ``d_p``):

* **pick** of candidate ``i`` among the shown ones — a softmax (Luce) choice:
  ``P(i | α) = exp(z_i(α)/τ) / Σ_j exp(z_j(α)/τ)``;
* **like** of ``i`` — Bradley–Terry comparisons with every other shown candidate ``j``:
  ``P(i ≻ j | α) = σ((z_i(α) − z_j(α))/τ)``; a **dislike** is the same with the sides swapped.

``τ`` (temperature) is in units of z, whose differences between candidates are small (log scores in
(−1, 0)); the default is chosen on validation users by ``pmgen evaluate-feedback``. The posterior
mean is the α to use (``alpha: "auto"``); its standard deviation says how sure it is; Thompson
sampling draws α from the posterior to explore. Cold start (no feedback) is the prior.

The user's picks also say which preference weights are worth generating (:class:`WeightStats`):
weights never chosen after enough feedback can be skipped — fewer candidates, faster.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from pmgen.stages.select import DEFAULT_ALPHA

GRID = tuple(i / 100 for i in range(101))
"""The α values the posterior lives on."""
SIGNALS = ("pick", "like", "dislike")
DEFAULT_TEMPERATURE = 0.02
"""τ of the choice likelihood, in units of z (chosen on validation users; see the module docstring)."""
PRIOR_STRENGTH = 4.0
"""The prior is Beta(s·α0, s·(1−α0)) on the grid: weak enough that a few picks move it."""


def z_values(d_t: Sequence[float], d_p: Sequence[float], alpha: float) -> list[float]:
    """``z_i(α)`` for every candidate (``d`` in (0, 1], clamped at 1e-6 like :mod:`pmgen.stages.select`)."""
    return [alpha * math.log(max(p, 1e-6)) + (1 - alpha) * math.log(max(t, 1e-6)) for t, p in zip(d_t, d_p)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def choice_log_likelihood(d_t: Sequence[float], d_p: Sequence[float], index: int, signal: str, alpha: float,
                          temperature: float = DEFAULT_TEMPERATURE) -> float:
    """``log P(feedback | α)`` for one feedback event on the shown candidates (see the module docstring)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
    if not 0 <= index < len(d_t) or len(d_t) != len(d_p):
        raise ValueError(f"candidate index {index} out of range for {len(d_t)} candidates")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = [v / temperature for v in z_values(d_t, d_p, alpha)]
    if signal == "pick":
        top = max(z)
        return z[index] - top - math.log(sum(math.exp(v - top) for v in z))
    sign = 1.0 if signal == "like" else -1.0
    return sum(_log_sigmoid(sign * (z[index] - z[j])) for j in range(len(z)) if j != index)


@dataclass
class AlphaPosterior:
    """A user's posterior over α on :data:`GRID` (log-probabilities, normalized).

    ``prior_alpha`` is where it started (the preset's α); ``n_events`` counts the feedback folded in.
    """

    log_p: list[float]
    prior_alpha: float
    temperature: float = DEFAULT_TEMPERATURE
    n_events: int = 0

    @classmethod
    def prior(cls, alpha: float = DEFAULT_ALPHA, strength: float = PRIOR_STRENGTH,
              temperature: float = DEFAULT_TEMPERATURE) -> AlphaPosterior:
        """Beta(strength·α, strength·(1−α)) on the grid, centred on ``alpha`` (cold start)."""
        if not 0 < alpha < 1:
            raise ValueError(f"the prior's alpha must be in (0, 1), got {alpha}")
        a, b = strength * alpha, strength * (1 - alpha)
        eps = 1e-3  # keep the grid's end points finite
        logs = [(a - 1) * math.log(min(max(g, eps), 1 - eps)) + (b - 1) * math.log(min(max(1 - g, eps), 1 - eps))
                for g in GRID]
        return cls(_normalize(logs), prior_alpha=alpha, temperature=temperature)

    # ------------------------------------------------------------------ updates
    def update(self, d_t: Sequence[float], d_p: Sequence[float], index: int, signal: str) -> AlphaPosterior:
        """Fold in one feedback event (``signal`` on candidate ``index`` of the shown ``d_t``, ``d_p``)."""
        self.log_p = _normalize([lp + choice_log_likelihood(d_t, d_p, index, signal, g, self.temperature)
                                 for lp, g in zip(self.log_p, GRID)])
        self.n_events += 1
        return self

    # ------------------------------------------------------------------ summaries
    @property
    def probs(self) -> list[float]:
        return [math.exp(v) for v in self.log_p]

    @property
    def mean(self) -> float:
        return sum(p * g for p, g in zip(self.probs, GRID))

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(max(sum(p * (g - m) ** 2 for p, g in zip(self.probs, GRID)), 0.0))

    def sample(self, rng: random.Random) -> float:
        """One α drawn from the posterior (Thompson sampling)."""
        u, acc = rng.random(), 0.0
        for p, g in zip(self.probs, GRID):
            acc += p
            if u <= acc:
                return g
        return GRID[-1]

    def to_json(self) -> dict[str, Any]:
        return {"log_p": [round(v, 6) for v in self.log_p], "prior_alpha": self.prior_alpha,
                "temperature": self.temperature, "n_events": self.n_events, "mean": round(self.mean, 4),
                "std": round(self.std, 4)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AlphaPosterior:
        log_p = [float(v) for v in obj["log_p"]]
        if len(log_p) != len(GRID):
            raise ValueError(f"posterior has {len(log_p)} grid points, expected {len(GRID)}")
        return cls(_normalize(log_p), prior_alpha=float(obj["prior_alpha"]),
                   temperature=float(obj.get("temperature", DEFAULT_TEMPERATURE)), n_events=int(obj.get("n_events", 0)))


def _normalize(logs: Sequence[float]) -> list[float]:
    top = max(logs)
    z = top + math.log(sum(math.exp(v - top) for v in logs))
    return [v - z for v in logs]


@dataclass
class WeightStats:
    """How often each preference weight was the one a user picked or liked (keys: the weight)."""

    counts: dict[float, float] = field(default_factory=dict)
    n_events: int = 0

    def update(self, weights: Sequence[float], index: int, signal: str) -> WeightStats:
        if signal in ("pick", "like"):
            w = float(weights[index])
            self.counts[w] = self.counts.get(w, 0.0) + 1.0
            self.n_events += 1
        return self

    def worth_generating(self, weights: Sequence[float], min_events: int = 5, min_share: float = 0.05) -> list[float]:
        """The weights to generate: all of them until ``min_events`` picks/likes, then those chosen at
        least ``min_share`` of the time, plus ``0`` (the baseline) and the nearest neighbours of each
        kept weight (so the user's balance can still move)."""
        ws = sorted({float(w) for w in weights} | {0.0})
        if self.n_events < min_events:
            return ws
        keep = {w for w in ws if self.counts.get(w, 0.0) / self.n_events >= min_share} | {0.0}
        for w in list(keep):
            i = ws.index(w)
            keep.update(ws[max(i - 1, 0): i + 2])
        return sorted(keep)

    def to_json(self) -> dict[str, Any]:
        return {"counts": {f"{k:g}": v for k, v in sorted(self.counts.items())}, "n_events": self.n_events}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> WeightStats:
        return cls({float(k): float(v) for k, v in obj.get("counts", {}).items()}, int(obj.get("n_events", 0)))


@dataclass(frozen=True)
class FeedbackEvent:
    """One feedback event on a stored generation: the shown candidates' scores, which one, and how."""

    weights: Sequence[float]
    d_t: Sequence[float]
    d_p: Sequence[float]
    candidate: int
    signal: str

    @classmethod
    def from_record(cls, record: Mapping[str, Any], candidate: int, signal: str) -> FeedbackEvent:
        """From a generation record's JSON (``record.json``, the store's record)."""
        cands = record["candidates"]
        return cls([c["weight"] for c in cands], [c["d_t"] for c in cands], [c["d_p"] for c in cands],
                   int(candidate), signal)


@dataclass
class UserBalance:
    """What feedback taught about one user: the α posterior and the weights worth generating."""

    posterior: AlphaPosterior
    weights: WeightStats

    @property
    def n_events(self) -> int:
        return self.posterior.n_events

    def alpha(self, default: float) -> tuple[float, str]:
        """The α to use and where it came from: the posterior mean once there is feedback, else ``default``."""
        if self.posterior.n_events == 0:
            return default, "preset"
        return round(self.posterior.mean, 4), (f"learned from {self.posterior.n_events} feedback event(s) "
                                               f"(posterior mean, sd {self.posterior.std:.2f})")

    def to_json(self) -> dict[str, Any]:
        return {"posterior": self.posterior.to_json(), "weights": self.weights.to_json()}


def learn(events: Sequence[FeedbackEvent], prior_alpha: float = DEFAULT_ALPHA,
          temperature: float = DEFAULT_TEMPERATURE) -> UserBalance:
    """Replay a user's feedback events (oldest first) into their :class:`UserBalance`."""
    post = AlphaPosterior.prior(prior_alpha, temperature=temperature)
    stats = WeightStats()
    for ev in events:
        post.update(ev.d_t, ev.d_p, ev.candidate, ev.signal)
        stats.update(ev.weights, ev.candidate, ev.signal)
    return UserBalance(post, stats)


def balance_from_store(store: Any, user_id: str, prior_alpha: float = DEFAULT_ALPHA) -> UserBalance:
    """Replay a user's feedback rows from a :class:`pmgen.data.store.Store` (each row names a stored
    generation whose record holds the shown candidates' scores)."""
    events = []
    for row in store.feedback(user_id):
        gen = store.generation(row["generation_id"])
        if gen is not None and gen.record:
            events.append(FeedbackEvent.from_record(gen.record, row["candidate"], row["signal"]))
    return learn(events, prior_alpha)


def open_store(data_root: Any = None, create: bool = False) -> Any:
    """The store ``pmgen serve`` and the CLI share (``<data dir>/serve/pmgen-serve.sqlite``), or ``None``
    when it does not exist yet (and ``create`` is false) or the ``serve`` extra is not installed."""
    from pmgen.paths import data_dir

    try:
        from pmgen.data.store import STORE_FILE, Store, sqlite_url
    except ImportError:  # sqlalchemy missing: no store, α stays the preset's
        if create:
            raise
        return None
    path = data_dir(data_root) / "serve" / STORE_FILE
    if not create and not path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return Store.open(sqlite_url(path))


def resolve_alpha(store: Any, user_id: str, default: float,
                  balance_of: Callable[[str], UserBalance] | None = None) -> tuple[float, str] | None:
    """The α a user's next generation uses when the request sets none: ``(α, source)`` learned from the
    user's feedback in ``store`` (:meth:`UserBalance.alpha`, prior centred on ``default``), or ``None``
    for a user without feedback (the preset's α then applies). ``balance_of``: a cached
    ``user_id → UserBalance`` (the service's) instead of replaying the store."""
    if store is None:
        return None
    b = balance_of(user_id) if balance_of is not None else balance_from_store(store, user_id, default)
    return b.alpha(default) if b.n_events else None
