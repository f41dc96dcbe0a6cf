"""Threat planning: the defenses and patch threats of a run, built once before any work.

:func:`plan_threat` is what every verb (certify, attack, training evaluation) calls: patch specs
resolved on the model's geometry (:class:`PatchPlan`), then every defense built for that threat
(:class:`DefensePlan`) through its own :meth:`~patchcert.defenses.Defense.for_threat` -- the
defense decides its threat-dependent defaults (masking's window, double masking's mask set);
nothing here knows a defense by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .defenses import Defense, Threat, defense_class
from .errors import PatchcertError
from .geometry import Geometry, PatchSpec, parse_patch
from .specs import DefenseSpec, jsonable, parse_defense_spec

log = logging.getLogger(__name__)

__all__ = ["DefensePlan", "PatchPlan", "build_defenses", "plan_patches", "plan_threat", "default_mask_shapes",
           "check_sources"]


@dataclass(frozen=True)
class DefensePlan:
    """A built defense: its stable ``key`` (record/summary label), JSON ``config`` (with what
    the defense describes about itself, e.g. its mask count) and the spec it came from."""

    key: str
    defense: Any
    config: dict[str, Any]
    spec: str

    @property
    def needs_images(self) -> bool:
        """The defense runs the model on images itself (no score file can stand in)."""
        return self.defense.evidence_source == "images"


@dataclass(frozen=True)
class PatchPlan:
    """A patch threat resolved for one geometry and image size.

    ``shapes``: the pixel rectangles ``(ph, pw)``; ``windows``: their distinct feature windows
    ``(wh, ww)``; ``shape_window[j]``: the index in ``windows`` of ``shapes[j]``.
    """

    text: str
    spec: PatchSpec
    shapes: list[tuple[int, int]]
    windows: list[tuple[int, int]]
    shape_window: list[int]
    resolved: str


def plan_patches(patches: Sequence[str | PatchSpec], geometry: Geometry, image_size: tuple[int, int]
                 ) -> list[PatchPlan]:
    """Parse and resolve every patch spec; one-line PatchcertError when malformed or too big."""
    if not patches:
        raise PatchcertError("no patch given")
    plans: list[PatchPlan] = []
    for p in patches:
        try:
            spec = parse_patch(p)
            shapes = spec.shapes(image_size)
        except PatchcertError:
            raise
        except ValueError as e:
            raise PatchcertError(str(e)) from None
        if any(q.text == spec.text for q in plans):
            raise PatchcertError(f"patch {spec.text!r} requested twice")
        windows: list[tuple[int, int]] = []
        idx = []
        for sh in shapes:
            w = geometry.window(sh)
            if w not in windows:
                windows.append(w)
            idx.append(windows.index(w))
        plans.append(PatchPlan(spec.text, spec, shapes, windows, idx, ",".join(f"{a}x{b}" for a, b in shapes)))
    return plans


def default_mask_shapes(plans: Sequence[PatchPlan]) -> list[tuple[int, int]]:
    """The shapes a mask-based defense without its own ``patch`` covers: the bounding shape of
    the requested patches if each threat is one shape (a mask set for a ``ph x pw`` patch
    covers every smaller one), else the union of every requested shape."""
    if all(len(p.shapes) == 1 for p in plans):
        return [(max(p.shapes[0][0] for p in plans), max(p.shapes[0][1] for p in plans))]
    out: list[tuple[int, int]] = []
    for p in plans:
        out += [s for s in p.shapes if s not in out]
    return out


def _build_one(s: Any, threat: Threat, deployment: Mapping[str, Mapping[str, Any]] | None = None) -> DefensePlan:
    if isinstance(s, Defense):
        if s.evidence_source == "images":  # built for this run's threat (e.g. its mask set)
            cls = type(s)
            s = cls.for_threat(cls.options_from_json({k: v for k, v in s.config.items() if k != "name"}), threat)
        elif threat.wrap and not s.wrap:
            raise PatchcertError(f"defense {s!s}: the score map's windows wrap around its edges (geometry.wrap); "
                                 "wrap=false would miss placements")
        return DefensePlan(s.key, s, jsonable({**s.config, **s.describe()}), s.key)
    if not isinstance(s, (str, DefenseSpec)):
        raise PatchcertError(f"a defense must be a spec string like 'voting' or a patchcert Defense, got {s!r}")
    spec = parse_defense_spec(s)
    params = dict(spec.params)
    try:
        cls = defense_class(spec.name)
        measured = {k: v for k, v in (deployment or {}).get(cls.name, {}).items() if k not in params}
        if measured:
            log.info("%s: the model's measured deployment options %s (checkpoint metadata 'deployment'; "
                     "give them in the spec to override)", spec.text,
                     ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in measured.items()))
        d = cls.for_threat({**measured, **params}, threat)
    except PatchcertError as e:
        raise PatchcertError(f"defense {spec.text!r}: {e}") from None
    except (TypeError, ValueError) as e:
        raise PatchcertError(f"defense {spec.text!r}: bad parameters ({e})") from None
    return DefensePlan(d.key, d, jsonable({**d.config, **d.describe()}), spec.text)


def build_defenses(specs: Sequence[str | DefenseSpec | Any], default_window: tuple[int, int] | None = None,
                   wrap: bool = False, image_size: tuple[int, int] | None = None,
                   default_shapes: Sequence[tuple[int, int]] | None = None,
                   threat: Threat | None = None,
                   deployment: Mapping[str, Mapping[str, Any]] | None = None) -> list[DefensePlan]:
    """Build every defense up front (bad names/parameters fail here, before any work).

    ``threat`` (or, spelled out, ``default_window``: the window covering the requested patch
    windows; ``wrap``: the score map's windows wrap around its edges -- De-randomized
    smoothing's bands; ``image_size`` and ``default_shapes``: for pixel defenses) is handed to
    each defense's :meth:`~patchcert.defenses.Defense.for_threat`. ``deployment``: per defense
    name, options a spec string that leaves them out takes (the model's measured deployment,
    :func:`patchcert.runs.source.deployment_options`); built Defense objects are taken as they are.
    """
    if not specs:
        raise PatchcertError("no defense given")
    if threat is None:
        threat = Threat(tuple(image_size) if image_size else (0, 0),  # type: ignore[arg-type]
                        windows=(tuple(default_window),) if default_window else (), wrap=wrap,  # type: ignore[arg-type]
                        mask_shapes=tuple(tuple(s) for s in default_shapes or ()))  # type: ignore[misc]
    plans: list[DefensePlan] = []
    for s in specs:
        plan = _build_one(s, threat, deployment)
        if any(p.key == plan.key for p in plans):
            raise PatchcertError(f"defense {plan.key!r} requested twice")
        plans.append(plan)
    return plans


def plan_threat(defenses: Sequence[str | DefenseSpec | Any], patches: Sequence[str | PatchSpec],
                geometry: Geometry, image_size: tuple[int, int],
                deployment: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[DefensePlan], list[PatchPlan]]:
    """The defenses and patches of a run, exactly as every verb (certify, attack, training
    evaluation) must build them for one model: patch specs resolved on ``geometry``, then each
    defense built for that threat (``wrap`` from the geometry: a wrapping map gets wrapping
    defenses, a non-wrapping one is refused)."""
    patch_plans = plan_patches(patches, geometry, image_size)
    threat = Threat(
        image_size=(int(image_size[0]), int(image_size[1])),
        shapes=tuple(s for p in patch_plans for s in p.shapes),
        windows=tuple(w for p in patch_plans for w in p.windows), wrap=geometry.wrap,
        mask_shapes=tuple(default_mask_shapes(patch_plans)))
    return build_defenses(defenses, threat=threat, deployment=deployment), patch_plans


def check_sources(defense_plans: Sequence[DefensePlan], patch_plans: Sequence[PatchPlan], has_model: bool,
                  map_size: tuple[int, int]) -> None:
    """Refuse image defenses without a model; warn about threats a defense can never certify."""
    for dp in defense_plans:
        if dp.needs_images and not has_model:
            raise PatchcertError(f"{dp.key} works on images and needs the model; a score file holds only "
                                 "score maps")
        uncovered = getattr(dp.defense, "uncovered", None)
        for pp in patch_plans:
            bad = uncovered(pp.shapes) if uncovered else []
            if bad:
                log.warning("%s: its mask set does not cover patch %s (%s); nothing is certified for it",
                            dp.key, pp.text, ", ".join(f"{a}x{b}" for a, b in bad))
    H, W = map_size
    for pp in patch_plans:
        for w in pp.windows:
            if H and (w[0] > H or w[1] > W):
                log.warning("patch %s: window %dx%d is larger than the %dx%d score map; nothing can be certified",
                            pp.text, w[0], w[1], H, W)
