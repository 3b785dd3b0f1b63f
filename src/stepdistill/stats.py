"""Paired statistics for comparing two students on the same test items, with the test item as the
unit: a sign-flip permutation test and a bootstrap interval over items (a student's seeds are
repeated measurements of an item, kept together), Holm's adjustment, and McNemar's exact test.

    p = sign_flip_test(a, b)            # a[s][i]: did seed s of method A get item i right
    interval = paired_bootstrap(a, b)   # {"diff", "low", "high"}
"""

from __future__ import annotations

import math
from typing import Any

BOOTSTRAP = 2000


def mcnemar(a: list[bool], b: list[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired outcomes: only the items where the two disagree count."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    k = min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p": p}


def paired_bootstrap(a: list[list[bool]], b: list[list[bool]], *, seed: int = 0) -> dict[str, float]:
    """Accuracy difference a - b and its 95% interval from a bootstrap over test items, the unit
    of the experiment (a[s][i]: seed s, item i; the same items in both). Each resampled item
    keeps all its seeds: seeds are repeated measurements of one item, not more items."""
    import numpy as np

    d = np.asarray(a, dtype=float).mean(0) - np.asarray(b, dtype=float).mean(0)  # per item, over seeds
    rng = np.random.default_rng(seed)
    boots = np.sort(d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(1))
    return {"diff": float(d.mean()), "low": float(boots[int(0.025 * BOOTSTRAP)]),
            "high": float(boots[int(0.975 * BOOTSTRAP) - 1])}


PERMUTATIONS = 20000  # random sign flips when too many items differ to enumerate every flip
EXACT_UP_TO = 16  # items that differ: up to this many, all 2**n sign flips are enumerated


def sign_flip_test(a: list[list[bool]], b: list[list[bool]], *, seed: int = 0) -> float:
    """Two-sided p of a paired permutation test with the test item as the unit: under the null
    hypothesis that the two methods are exchangeable, each item's difference (A's accuracy on it
    over the seeds minus B's) is as likely to have either sign. With one seed it is McNemar's
    exact test; with several, an item that one method gets right on every seed counts once, not
    once per seed (pooling seeds x items as independent makes p-values too small)."""
    import numpy as np

    d = np.asarray(a, dtype=float).mean(0) - np.asarray(b, dtype=float).mean(0)
    nz = d[np.abs(d) > 1e-12]
    if not len(nz):
        return 1.0
    observed = abs(nz.sum()) - 1e-9  # a flip as extreme as the data counts (float sums of thirds)
    if len(nz) <= EXACT_UP_TO:
        signs = ((np.arange(2 ** len(nz))[:, None] >> np.arange(len(nz))) & 1) * 2 - 1
        return float((np.abs(signs @ nz) >= observed).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, PERMUTATIONS, 2000):  # in blocks: memory stays small for thousands of items
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(2000, PERMUTATIONS - start), len(nz)))
        hits += int((np.abs(signs @ nz) >= observed).sum())
    return (hits + 1) / (PERMUTATIONS + 1)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment: the family-wise error stays at alpha over all comparisons."""
    order = sorted(range(len(pvalues)), key=pvalues.__getitem__)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
