"""Independent NumPy reference for the filters (float64, one row at a time, plain loops).

Written straight from docs/sampling.md, sharing no code with jaxsample. Each
``*_row`` function takes one row ``x`` (float64, ``-inf`` allowed) and a scalar value,
and returns ``(out, margin)``: the filtered row (removed tokens ``-inf``, kept ones
unchanged) and how far the decision was from a boundary (``inf`` when no rounding can
change the kept set). A float32 implementation may legitimately disagree only on rows
whose margin is tiny; tests skip exact comparison on those rows (and count them).

``apply(row_fn, logits, values, **kw)`` runs a row function over every row of a
``[..., V]`` array with per-row values.
"""

from __future__ import annotations

import math

import numpy as np

NEG_INF = -np.inf


# ----------------------------------------------------------------------------- basics


def softmax(x):
    """softmax of one row in float64; ``-inf`` entries get 0."""
    x = np.asarray(x, np.float64)
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def entropy(q):
    q = np.asarray(q, np.float64)
    nz = q > 0
    return float(-np.sum(q[nz] * np.log(q[nz])))


def descending_order(values):
    """Indices sorting ``values`` from largest to smallest (stable, plain sort)."""
    return sorted(range(len(values)), key=lambda i: -values[i])


def top_m_mask(x, m):
    """The m highest logits and every tie with the m-th one."""
    order = descending_order(x)
    kth = x[order[min(m, len(x)) - 1]]
    return x >= kth


def _mask(x, keep):
    return np.where(keep, x, NEG_INF)


def _first_reaching(masses, p):
    """Index of the first running mass >= p (the last index if none) and the margin.

    The margin is the smallest distance between p and a running mass up to that index.
    """
    cum = 0.0
    margin = math.inf
    for j, w in enumerate(masses):
        cum += w
        margin = min(margin, abs(cum - p))
        if cum >= p:
            return j, margin
    return len(masses) - 1, margin


# ----------------------------------------------------------------------------- filters


def temperature_row(x, t):
    x = np.asarray(x, np.float64)
    if t == 0:
        i = int(np.argmax(x))  # numpy: first maximum
        out = np.full_like(x, NEG_INF)
        out[i] = x[i]
        return out, math.inf
    return x / t, math.inf


def top_k_row(x, k, m=1):
    x = np.asarray(x, np.float64)
    v = len(x)
    if k == 0 or k >= v:
        return x.copy(), math.inf
    k = max(int(k), m)
    order = descending_order(x)
    kth = x[order[k - 1]]
    return _mask(x, x >= kth), math.inf


def top_p_row(x, p, m=1):
    x = np.asarray(x, np.float64)
    if p >= 1:
        return x.copy(), math.inf
    q = softmax(x)
    order = descending_order(q)
    hit, margin = _first_reaching([q[i] for i in order], p)
    q_m = q[order[hit]]
    keep = (q >= q_m) | top_m_mask(x, m)
    return _mask(x, keep), margin


def min_p_row(x, p, m=1):
    x = np.asarray(x, np.float64)
    q = softmax(x)
    keep = (q >= p * q.max()) | top_m_mask(x, m)
    finite = np.isfinite(x)
    if 0 < p < 1 and finite.any():  # p = 1: the threshold is the max itself, exact
        margin = float(np.min(np.abs((x[finite] - x.max()) - math.log(p))))
    else:
        margin = math.inf
    return _mask(x, keep), margin


def typical_p_row(x, p, m=1):
    x = np.asarray(x, np.float64)
    if p >= 1:
        return x.copy(), math.inf
    q = softmax(x)
    h = entropy(q)
    surprisal = -log_softmax(x)  # finite for every finite logit, even where q underflows
    score = np.abs(surprisal - h)  # inf for a -inf logit
    order = sorted(range(len(x)), key=lambda i: score[i])  # most typical first
    hit, margin = _first_reaching([q[i] for i in order], p)
    s_m = score[order[hit]]
    # min_tokens_to_keep counts the most *typical* tokens (lowest score, ties kept), as
    # transformers' TypicalLogitsWarper; the arg-max is not forced in.
    s_m = max(s_m, score[order[min(m, len(x)) - 1]])
    keep = score <= s_m
    others = score[np.isfinite(score) & (score != s_m)]
    if others.size and np.isfinite(s_m):
        margin = min(margin, float(np.min(np.abs(others - s_m))))
    return _mask(x, keep), margin


def epsilon_cutoff_row(x, eps, m=1):
    x = np.asarray(x, np.float64)
    q = softmax(x)
    keep = (q >= eps) | top_m_mask(x, m)
    return _mask(x, keep), _log_margin(q, eps)


def eta_cutoff_row(x, eta, m=1):
    x = np.asarray(x, np.float64)
    q = softmax(x)
    cutoff = min(eta, math.sqrt(eta) * math.exp(-entropy(q)))
    keep = (q >= cutoff) | top_m_mask(x, m)
    return _mask(x, keep), _log_margin(q, cutoff)


def _log_margin(q, cutoff):
    if cutoff <= 0:
        return math.inf
    nz = q > 0
    return float(np.min(np.abs(np.log(q[nz]) - math.log(cutoff)))) if nz.any() else math.inf


def top_n_sigma_row(x, n, m=1):
    x = np.asarray(x, np.float64)
    finite = x[np.isfinite(x)]
    if math.isinf(n) or finite.size == 0:
        return x.copy(), math.inf
    mean = finite.sum() / finite.size
    std = math.sqrt(np.sum((finite - mean) ** 2) / finite.size)
    threshold = finite.max() - n * std
    keep = (x >= threshold) | top_m_mask(x, m)
    if n == 0 or std == 0:  # the threshold is the max itself, exact
        margin = math.inf
    else:
        margin = float(np.min(np.abs(finite - threshold)))
    return _mask(x, keep), margin


def logit_bias_row(x, bias):
    return np.asarray(x, np.float64) + np.asarray(bias, np.float64), math.inf


def sparse_logit_bias_row(x, ids, values):
    out = np.asarray(x, np.float64).copy()
    for i, v in zip(ids, values):
        if i >= 0:
            out[i] += v
    return out, math.inf


def ban_tokens_row(x, ids):
    out = np.asarray(x, np.float64).copy()
    for i in ids:
        if i >= 0:
            out[i] = NEG_INF
    return out, math.inf


def allow_tokens_row(x, ids):
    x = np.asarray(x, np.float64)
    out = np.full_like(x, NEG_INF)
    for i in ids:
        if i >= 0:
            out[i] = x[i]
    return out, math.inf


ROW_FUNCTIONS = {
    "temperature": temperature_row,
    "top_k": top_k_row,
    "top_p": top_p_row,
    "min_p": min_p_row,
    "typical_p": typical_p_row,
    "epsilon_cutoff": epsilon_cutoff_row,
    "eta_cutoff": eta_cutoff_row,
    "top_n_sigma": top_n_sigma_row,
}


def apply(row_fn, logits, value, **kwargs):
    """Applies ``row_fn`` to every row with per-row ``value`` (broadcast to the batch).

    Returns ``(out float64[..., V], margin float64[...])``.
    """
    logits = np.asarray(logits, np.float64)
    batch = logits.shape[:-1]
    values = np.broadcast_to(np.asarray(value), batch).reshape(-1)
    rows = logits.reshape(-1, logits.shape[-1])
    outs, margins = [], []
    for row, v in zip(rows, values):
        out, margin = row_fn(row, v.item(), **kwargs)
        outs.append(out)
        margins.append(margin)
    return np.stack(outs).reshape(logits.shape), np.array(margins).reshape(batch)


def probabilities(logits):
    """Row-wise softmax of ``[..., V]`` in float64."""
    logits = np.asarray(logits, np.float64)
    rows = logits.reshape(-1, logits.shape[-1])
    return np.stack([softmax(r) for r in rows]).reshape(logits.shape)
