"""Brute-force reference defenses: plain Python loops over images, classes, placements and cells,
following ``docs/certification.md`` literally. Slow by design; for tiny maps only.

Each ``*_predict`` returns a list of ints; each ``*_details`` returns a list (one per image) of
dicts with the fields of :class:`patchcert.defenses.CertifyResult` as Python values, with the
same worst-case ordering: smallest margin, then lowest class, then first window, then the first
placement in row-major order. Feature transforms are computed per cell with ``math``.
"""

from __future__ import annotations

import math
from fractions import Fraction

INF = float("inf")
GRID = 2.0**-32


# -- shared helpers ----------------------------------------------------------------------------


def argmax_low(values):
    """Index of the largest value, the lowest index on ties (torch.argmax's rule)."""
    best = 0
    for c in range(1, len(values)):
        if values[c] > values[best]:
            best = c
    return best


def passes(margin, c, y):
    """The tie rule: margin > 0, or margin == 0 with the competing class above the label."""
    return margin > 0 or (margin == 0 and c > y)


def placements(H, W, wh, ww, wrap):
    """Top-left corners of every placement of a wh x ww window ([] if it does not fit)."""
    if wh > H or ww > W:
        return []
    rows = range(H) if wrap else range(H - wh + 1)
    cols = range(W) if wrap else range(W - ww + 1)
    return [(i, j) for i in rows for j in cols]


def cells(i, j, wh, ww, H, W, wrap):
    """The cells (r, c) of the window with top-left (i, j)."""
    if wrap:
        return [((i + a) % H, (j + b) % W) for a in range(wh) for b in range(ww)]
    return [(i + a, j + b) for a in range(wh) for b in range(ww)]


def wsum(m, cs):
    total = 0.0
    for r, c in cs:
        total += m[r][c]
    return total


def total_sum(m):
    total = 0.0
    for row in m:
        for x in row:
            total += x
    return total


def softmax_cell(vals):
    mx = max(vals)
    e = [math.exp(x - mx) for x in vals]
    z = 0.0
    for x in e:
        z += x
    return [x / z for x in e]


def grid_for(scale):
    """The defenses' fixed-point step: 2^(ceil(log2 scale) - 32)."""
    return 2.0 ** (math.ceil(math.log2(scale)) - 32)


def quantize(x, grid=GRID):
    """Nearest multiple of ``grid`` (ties to even, like torch.round)."""
    return round(x / grid) * grid


def per_cell(u, fn):
    """Apply ``fn`` to every cell's class vector of ``u`` [K][H][W] -> [K][H][W]."""
    K, H, W = len(u), len(u[0]), len(u[0][0])
    out = [[[0.0] * W for _ in range(H)] for _ in range(K)]
    for r in range(H):
        for c in range(W):
            vec = fn([u[k][r][c] for k in range(K)])
            for k in range(K):
                out[k][r][c] = vec[k]
    return out


def combine(y, window_cases, ok, clean):
    """Per-image certify_details from per-window cases.

    window_cases: one entry per window: None (window not certifiable) or a list of
    ``(margin, class, row, col)`` (every placement and class); ok: the clean-map requirements
    hold; clean: ``(margin, class)``. Per placement the case is its smallest margin with the
    lowest class attaining it; the worst case is the smallest margin, then a tie against the
    label (class below it) first, then the first window, then the first placement (row-major).
    """
    per_window, allcases = [], []
    for w, cases in enumerate(window_cases):
        if cases is None:
            per_window.append(False)
            allcases.append((-INF, False, w, -1, -1, -1))
            continue
        per_window.append(ok and all(passes(m, c, y) for m, c, _, _ in cases))
        at = {}
        for m, c, r, q in cases:
            at[(r, q)] = min(at.get((r, q), (INF, INF)), (m, c))
        allcases += [(m, c > y, w, r, q, c) for (r, q), (m, c) in at.items()]
    m, _, w, r, q, c = min(allcases)
    if passes(m, c, y) and not ok:
        m, c, r, q = clean[0], clean[1], -1, -1
    return {
        "certified": all(per_window),
        "per_window": per_window,
        "margin": m,
        "window_index": w,
        "row": r,
        "col": q,
        "worst_class": c,
    }


def clean_margin(values, y):
    """(min over c != y of values[y] - values[c], lowest such class); (inf, -1) when K == 1."""
    cands = [(values[y] - values[c], c) for c in range(len(values)) if c != y]
    return min(cands) if cands else (INF, -1)


# -- voting ------------------------------------------------------------------------------------


def votes(u, binarize):
    """Votes [K][H][W] in {0, 1} from one score map u [K][H][W]."""
    K = len(u)
    if binarize == "sign":
        return [[[1.0 if x >= 0 else 0.0 for x in row] for row in plane] for plane in u]
    if binarize == "argmax":
        return per_cell(u, lambda v: [1.0 if k == argmax_low(v) else 0.0 for k in range(K)])
    theta = float(binarize)
    return per_cell(u, lambda v: [1.0 if p >= theta else 0.0 for p in softmax_cell(v)])


def voting_predict(scores, binarize="sign"):
    out = []
    for u in scores.tolist():
        s = votes(u, binarize)
        out.append(argmax_low([total_sum(p) for p in s]))
    return out


def voting_window_cases(s, y, window, condition="3.2", wrap=False):
    """(margin, class, row, col) for every placement and class c != y, or None if the window
    does not fit; s: votes [K][H][W]."""
    K, H, W = len(s), len(s[0]), len(s[0][0])
    wh, ww = window
    pl = placements(H, W, wh, ww, wrap)
    if not pl:
        return None
    n = [total_sum(p) for p in s]
    area = wh * ww
    if condition == "3.3":
        cases = [(n[y] - n[c] - 2 * area, c, 0, 0) for c in range(K) if c != y]
        return cases if K > 1 else [(INF, -1, 0, 0)]
    cases = []
    for i, j in pl:
        cs = cells(i, j, wh, ww, H, W, wrap)
        if K == 1:
            cases.append((INF, -1, i, j))
        for c in range(K):
            if c != y:
                m = (n[y] - wsum(s[y], cs)) - (n[c] - wsum(s[c], cs)) - area
                cases.append((m, c, i, j))
    return cases


def voting_details(scores, labels, windows, binarize="sign", condition="3.2", wrap=False):
    res = []
    for u, y in zip(scores.tolist(), labels.tolist()):
        s = votes(u, binarize)
        n = [total_sum(p) for p in s]
        ok = argmax_low(n) == y
        wc = [voting_window_cases(s, y, w, condition, wrap) for w in windows]
        res.append(combine(y, wc, ok, clean_margin(n, y)))
    return res


# -- clipping ----------------------------------------------------------------------------------


def clip_range(clip):
    """(lo, hi) of the clipped values: (-1, 1) for tanh, else the range rounded to the grid."""
    if clip == "tanh":
        return (-1.0, 1.0)
    g = grid_for(max(abs(clip[0]), abs(clip[1])))
    return (quantize(clip[0], g), quantize(clip[1], g))


def clip_map(u, clip="tanh", scale=0.05, shift=-1.0):
    if clip == "tanh":
        return [[[quantize(math.tanh(x * scale + shift)) for x in row] for row in plane] for plane in u]
    lo, hi = clip
    g = grid_for(max(abs(lo), abs(hi)))
    return [[[quantize(min(max(x, lo), hi), g) for x in row] for row in plane] for plane in u]


def clipping_predict(scores, clip="tanh", scale=0.05, shift=-1.0):
    return [argmax_low([total_sum(p) for p in clip_map(u, clip, scale, shift)]) for u in scores.tolist()]


def clipping_window_cases(v, y, window, lo, hi, wrap=False):
    """(margin, class, row, col) for every placement and c != y (None if the window does not fit);
    v: clipped scores [K][H][W]."""
    K, H, W = len(v), len(v[0]), len(v[0][0])
    wh, ww = window
    pl = placements(H, W, wh, ww, wrap)
    if not pl:
        return None
    area = wh * ww
    cases = []
    for i, j in pl:
        inside = set(cells(i, j, wh, ww, H, W, wrap))
        outside = [(r, c) for r in range(H) for c in range(W) if (r, c) not in inside]
        oy = wsum(v[y], outside)
        if K == 1:
            cases.append((INF, -1, i, j))
        for c in range(K):
            if c != y:
                m = (oy + area * lo) - (wsum(v[c], outside) + area * hi)
                cases.append((m, c, i, j))
    return cases


def clipping_details(scores, labels, windows, clip="tanh", wrap=False, scale=0.05, shift=-1.0):
    lo, hi = clip_range(clip)
    res = []
    for u, y in zip(scores.tolist(), labels.tolist()):
        v = clip_map(u, clip, scale, shift)
        g = [total_sum(p) for p in v]
        ok = argmax_low(g) == y
        wc = [clipping_window_cases(v, y, w, lo, hi, wrap) for w in windows]
        res.append(combine(y, wc, ok, clean_margin(g, y)))
    return res


# -- masking -----------------------------------------------------------------------------------


def mask_features(u, features="logits", clip_max=None):
    K = len(u)
    if features == "logits":
        v = [[[x for x in row] for row in plane] for plane in u]
    elif features == "confidence":
        v = per_cell(u, softmax_cell)
    else:
        v = per_cell(u, lambda vec: [1.0 if k == argmax_low(vec) else 0.0 for k in range(K)])
    hi = INF if clip_max is None else clip_max
    g = grid_for(clip_max if clip_max is not None else (16.0 if features == "logits" else 1.0))
    return [[[quantize(min(max(x, 0.0), hi), g) for x in row] for row in plane] for plane in v]


def detected(m, g, T):
    """PatchGuard's detection test ``g > 0 and m / g > T``, in exact rational arithmetic (T at the
    exact value of the float)."""
    return g > 0 and Fraction(m) / Fraction(g) > Fraction(T)


def masking_margin(lb, t, T):
    """``lb - t / (1 - T)``: the rounded float value, with the sign of the exact rational value
    (0 when it is exactly 0; +-2^-1022 when rounding moved it across 0)."""
    approx = lb - t / (1 - T)
    exact = Fraction(lb) - Fraction(t) / (1 - Fraction(T))
    sign = (exact > 0) - (exact < 0)
    if (approx > 0) - (approx < 0) == sign:
        return approx
    return sign * 2.0**-1022


def masked_sums(v, window, T, wrap):
    """Alg. 1: per class, subtract its strongest window if g > 0 and m / g > T."""
    K, H, W = len(v), len(v[0]), len(v[0][0])
    mh, mw = min(window[0], H), min(window[1], W)
    pl = placements(H, W, mh, mw, wrap)
    out = []
    for c in range(K):
        g = total_sum(v[c])
        m = max(wsum(v[c], cells(i, j, mh, mw, H, W, wrap)) for i, j in pl)
        if detected(m, g, T):
            g -= m
        out.append(g)
    return out


def masking_predict(scores, window, threshold=0.0, clip_max=None, features="logits", wrap=False):
    out = []
    for u in scores.tolist():
        v = mask_features(u, features, clip_max)
        out.append(argmax_low(masked_sums(v, window, threshold, wrap)))
    return out


def masking_cases(v, y, window, T, wrap, corrected=True):
    """Alg. 2 with the T > 0 correction: (margin, class, row, col) for every placement P of the
    mask window and every class c != y. ``corrected=False``: the unsound original bound, which
    subtracts nothing when the zeroed map would not be detected (for the regression test)."""
    K, H, W = len(v), len(v[0]), len(v[0][0])
    mh, mw = window
    pl = placements(H, W, mh, mw, wrap)
    g = [total_sum(p) for p in v]
    cellsets = {P: cells(P[0], P[1], mh, mw, H, W, wrap) for P in pl}
    cases = []
    for P in pl:
        cp = cellsets[P]
        sp = set(cp)
        t = [g[c] - wsum(v[c], cp) for c in range(K)]
        z = [row[:] for row in v[y]]
        for r, c in cp:
            z[r][c] = 0.0
        sums = {Q: wsum(z, cellsets[Q]) for Q in pl}
        m_all = max(sums.values())
        m_ovl = max([0.0] + [sums[Q] for Q in pl if sp.intersection(cellsets[Q])])
        tot = total_sum(z)
        M = m_all if detected(m_all, tot, T) else (m_ovl if corrected else 0.0)
        lb = t[y] - M
        if K == 1:
            cases.append((INF, -1, P[0], P[1]))
        for c in range(K):
            if c != y:
                cases.append((masking_margin(lb, t[c], T), c, P[0], P[1]))
    return cases


def masking_details(scores, labels, windows, window, threshold=0.0, clip_max=None, features="logits", wrap=False):
    res = []
    mh, mw = window
    for u, y in zip(scores.tolist(), labels.tolist()):
        v = mask_features(u, features, clip_max)
        H, W = len(v[0]), len(v[0][0])
        g = [total_sum(p) for p in v]
        gm = masked_sums(v, window, threshold, wrap)
        ok = argmax_low(g) == y and argmax_low(gm) == y
        clean = min(clean_margin(g, y), clean_margin(gm, y))
        analysis = None
        wc = []
        for wh, ww in windows:
            if wh > mh or ww > mw or mh > H or mw > W:
                wc.append(None)
                continue
            if analysis is None:
                analysis = masking_cases(v, y, window, threshold, wrap)
            wc.append(analysis)
        res.append(combine(y, wc, ok, clean))
    return res


# -- margin maps -------------------------------------------------------------------------------


def margin_map_from_cases(cases, shape):
    """Min margin per placement [Hp][Wp] from (margin, class, row, col) cases; 3.3's
    placement-independent cases (row = col = 0 only) fill the whole map."""
    Hp, Wp = shape
    out = [[INF] * Wp for _ in range(Hp)]
    rows = {(r, q) for _, _, r, q in cases}
    for m, _, r, q in cases:
        out[r][q] = min(out[r][q], m)
    if rows == {(0, 0)} and Hp * Wp > 1:
        out = [[out[0][0]] * Wp for _ in range(Hp)]
    return out


def margin_map(kind, params, scores, labels, window):
    """Reference ``Defense.margin_map`` for ``kind`` in voting/clipping/masking; ``params`` are
    the ``create_defense`` options. Returns a list (per image) of [Hp][Wp] lists."""
    H, W = scores.shape[2], scores.shape[3]
    wrap = params.get("wrap", False)
    awin = tuple(params["window"]) if kind == "masking" else tuple(window)
    if awin[0] > H or awin[1] > W:
        return [[] for _ in range(scores.shape[0])]
    shape = (H, W) if wrap else (H - awin[0] + 1, W - awin[1] + 1)
    out = []
    for u, y in zip(scores.tolist(), labels.tolist()):
        if kind == "voting":
            s = votes(u, params.get("binarize", "sign"))
            cases = voting_window_cases(s, y, window, params.get("condition", "3.2"), wrap)
        elif kind == "clipping":
            clip = params.get("clip", "tanh")
            lo, hi = clip_range(clip)
            v = clip_map(u, clip, params.get("scale", 0.05), params.get("shift", -1.0))
            cases = clipping_window_cases(v, y, window, lo, hi, wrap)
        else:
            mh, mw = params["window"]
            v = mask_features(u, params.get("features", "logits"), params.get("clip_max"))
            if window[0] > mh or window[1] > mw:
                out.append([[-INF] * shape[1] for _ in range(shape[0])])
                continue
            cases = masking_cases(v, y, (mh, mw), params.get("threshold", 0.0), wrap)
        out.append(margin_map_from_cases(cases, shape))
    return out
