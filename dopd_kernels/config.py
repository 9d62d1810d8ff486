"""Route configuration: the route table (source, divergence, support, weight) and the presets.

The DOPD specification (``shared/docs/dopd-method.md``) routes every valid token to one of four routes.
Each route maps to a :class:`RouteSpec`; a :class:`RouteConfig` holds the table plus the scalar knobs.
Presets are just other tables, so vanilla OPD, GKD, OPSD and SDPO run through the same code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

#: Route names in id order: 0=LH, 1=LL, 2=HT, 3=HS (-1 marks masked tokens).
ROUTES: tuple[str, ...] = ("LH", "LL", "HT", "HS")

SOURCES = ("teacher", "self")
DIVERGENCES = ("rkl", "fkl", "jsd")
SUPPORTS = ("full", "topk", "sampled")
NORMALIZATIONS = ("minmax", "zscore", "none")
REDUCTIONS = ("seq_mean", "token_mean", "sum")
#: A route weight may name one of these config fields instead of a number.
WEIGHT_NAMES = ("beta_light", "beta_weak")


@dataclass(frozen=True)
class RouteSpec:
    """What one route does: ``weight * divergence(student, source)`` on ``support``.

    source: "teacher" or "self" (the privileged student, stop-gradient).
    divergence: "rkl" = KL(S || src), "fkl" = KL(src || S), "jsd" = generalized JSD with ``jsd_beta``.
    support: "full" (whole vocabulary), "topk" (top-K of the source, both renormalized), or
        "sampled" (single-sample reverse-KL policy-gradient form at the sampled token; rkl only).
    weight: a float, or "beta_light" / "beta_weak" to read that field of the RouteConfig.
    """

    source: str
    divergence: str
    support: str
    weight: Union[float, str] = 1.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"routes: source must be one of {SOURCES}, got {self.source!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"routes: divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.support not in SUPPORTS:
            raise ValueError(f"routes: support must be one of {SUPPORTS}, got {self.support!r}")
        if self.support == "sampled" and self.divergence != "rkl":
            raise ValueError("routes: support 'sampled' is the single-sample reverse-KL form; use divergence 'rkl'")
        if isinstance(self.weight, str):
            if self.weight not in WEIGHT_NAMES:
                raise ValueError(f"routes: weight must be a number or one of {WEIGHT_NAMES}, got {self.weight!r}")
        elif isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"routes: weight must be a number, got {self.weight!r}")
        elif not (self.weight >= 0.0 and self.weight < float("inf")):
            raise ValueError(f"routes: weight must be finite and >= 0, got {self.weight!r}")

    @classmethod
    def coerce(cls, value: Any) -> "RouteSpec":
        """Build a RouteSpec from a RouteSpec, a (source, divergence, support[, weight]) tuple or a dict."""
        if isinstance(value, RouteSpec):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"routes: unknown route field(s) {sorted(unknown)}")
            return cls(**value)
        if isinstance(value, (tuple, list)) and 3 <= len(value) <= 4:
            return cls(*value)
        raise ValueError(f"routes: each route must be a RouteSpec, a dict or a 3/4-tuple, got {value!r}")


#: The paper's table (dopd-method.md, "The four routes").
DOPD_ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec("teacher", "rkl", "topk", "beta_light"),  # LH
    RouteSpec("self", "rkl", "topk", "beta_weak"),  # LL
    RouteSpec("teacher", "jsd", "full", 1.0),  # HT (jsd_beta = 0.5 is JS)
    RouteSpec("self", "rkl", "topk", "beta_light"),  # HS
)

_PRESET_ROUTE: dict[str, RouteSpec] = {
    "vanilla_opd": RouteSpec("teacher", "rkl", "full", 1.0),
    "vanilla_opd_sampled": RouteSpec("teacher", "rkl", "sampled", 1.0),
    "gkd": RouteSpec("teacher", "jsd", "full", 1.0),
    "opsd": RouteSpec("self", "jsd", "topk", 1.0),
    "sdpo": RouteSpec("self", "rkl", "full", 1.0),
}
PRESETS: tuple[str, ...] = ("dopd",) + tuple(_PRESET_ROUTE)


@dataclass(frozen=True)
class RouteConfig:
    """Every knob of the routed loss. Defaults are the paper's (dopd-method.md).

    top_k: K of the top-K routes (clipped to the vocabulary size).
    beta_light / beta_weak: route weights that the table may name.
    trim: fraction of the largest values dropped from the routing statistics, in [0, 1).
    normalize: "minmax" | "zscore" | "none" for the routing statistics.
    temperature: divides the logits of all three models, for routing and for losses.
    reduction: "seq_mean" (paper) | "token_mean" | "sum".
    ce_weight: weight of an optional hard-label cross-entropy term (needs ``hard_labels``).
    jsd_beta: beta of the generalized JSD, in (0, 1); 0.5 is JS.
    routes: the four RouteSpecs, in ROUTES order (tuples or dicts are accepted).
    chunk_size: tokens per chunk of the loss pass on the PyTorch path: the memory knob (peak about
        5 x chunk_size x V floats; the statistics pass uses 4 x chunk_size tokens and one such buffer).
    stats_group: a torch.distributed process group: routing statistics over all its ranks.
    check_values: validate data-dependent inputs (finite hidden states, target ids in range). Costs one
        host synchronisation; turn off inside CUDA graphs once the inputs are trusted.
    """

    top_k: int = 128
    beta_light: float = 0.6
    beta_weak: float = 0.3
    trim: float = 0.05
    normalize: str = "minmax"
    temperature: float = 1.0
    reduction: str = "seq_mean"
    ce_weight: float = 0.0
    jsd_beta: float = 0.5
    routes: Sequence[Any] = DOPD_ROUTES
    chunk_size: int = 256
    stats_group: Any = field(default=None, compare=False)
    check_values: bool = True

    def __post_init__(self) -> None:
        routes = self.routes
        if isinstance(routes, Mapping):
            unknown = set(routes) - set(ROUTES)
            if unknown:
                raise ValueError(f"routes: unknown route name(s) {sorted(unknown)}; expected {ROUTES}")
            missing = set(ROUTES) - set(routes)
            if missing:
                raise ValueError(f"routes: missing route(s) {sorted(missing)}")
            routes = [routes[name] for name in ROUTES]
        if isinstance(routes, (str, bytes)) or not isinstance(routes, Sequence) or len(routes) != len(ROUTES):
            raise ValueError(f"routes: expected {len(ROUTES)} routes in the order {ROUTES}, got {routes!r}")
        object.__setattr__(self, "routes", tuple(RouteSpec.coerce(r) for r in routes))
        _check_int("top_k", self.top_k, minimum=1)
        _check_int("chunk_size", self.chunk_size, minimum=1)
        _check_number("beta_light", self.beta_light, low=0.0)
        _check_number("beta_weak", self.beta_weak, low=0.0)
        _check_number("ce_weight", self.ce_weight, low=0.0)
        _check_number("temperature", self.temperature, low=0.0, low_open=True)
        _check_number("trim", self.trim, low=0.0, high=1.0)
        _check_number("jsd_beta", self.jsd_beta, low=0.0, high=1.0, low_open=True)
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not isinstance(self.check_values, bool):
            raise ValueError(f"check_values must be a bool, got {self.check_values!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RouteConfig":
        """The route table of a named method: "dopd", "vanilla_opd", "vanilla_opd_sampled", "gkd", "opsd", "sdpo".

        Any other RouteConfig field can be overridden, e.g. ``RouteConfig.preset("gkd", jsd_beta=0.9)``.
        """
        if name not in PRESETS:
            raise ValueError(f"preset: unknown preset {name!r}; expected one of {PRESETS}")
        if "routes" in overrides:
            raise ValueError("preset: a preset fixes the route table; build RouteConfig(routes=...) instead")
        routes = DOPD_ROUTES if name == "dopd" else (_PRESET_ROUTE[name],) * len(ROUTES)
        return cls(routes=routes, **overrides)

    def replace(self, **changes: Any) -> "RouteConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def route_weight(self, route_id: int) -> float:
        """The numeric weight of route ``route_id`` (names resolved against this config)."""
        weight = self.routes[route_id].weight
        return float(getattr(self, weight)) if isinstance(weight, str) else float(weight)

    def effective_top_k(self, vocab_size: int) -> int:
        """K clipped to the vocabulary size."""
        return min(self.top_k, vocab_size)

    def topk_sources(self) -> frozenset[str]:
        """The sources whose top-K indices some route needs."""
        return frozenset(r.source for r in self.routes if r.support == "topk")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(
    name: str, value: Any, *, low: float, high: float = float("inf"), low_open: bool = False
) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {lo}{low}, {high}), got {value!r}")
