"""Small statistics shared by the tools that judge runs: summaries, a one-sided t-test, Welch's t-test.

Tools in `tools/` are run as scripts (`python tools/leaderboard.py`), which puts `tools/` first on `sys.path`;
they import this module as `import stats`.

Conventions, stated once for every caller:
- std is the sample standard deviation (ddof=1): runs are a sample of the recipe's seeds, not the population.
- Every function needs at least 2 samples per group and raises ValueError otherwise: with one run there is
  no spread, so no claim can be tested.
- Zero variance (every run identical, which happens with kNN accuracies that are multiples of 0.01 %) makes the
  t statistic infinite or undefined. We then decide from the means alone rather than fail: a p-value of 0.0 when
  the means say the claim holds, 1.0 when they say it does not. The docstrings give the exact rule.

The t distribution comes from scipy.stats.
"""

import math
from collections.abc import Sequence

from scipy.stats import t as student_t

MIN_SAMPLES = 2


def _as_floats(xs: Sequence[float], name: str) -> list[float]:
    values = [float(x) for x in xs]
    if len(values) < MIN_SAMPLES:
        raise ValueError(f"{name} needs at least {MIN_SAMPLES} samples for a standard deviation, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} has a non-finite value: {values}")
    return values


def _mean_var(values: list[float]) -> tuple[float, float]:
    # Identical values must give exactly zero variance (fsum/n can round 90.1 to 90.09999999999998), so that the
    # zero-variance rules below apply to them.
    if min(values) == max(values):
        return values[0], 0.0
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, var


def summarize(xs: Sequence[float]) -> tuple[float, float]:
    """Return (mean, sample standard deviation with ddof=1) of xs. Raises ValueError if len(xs) < 2."""
    mean, var = _mean_var(_as_floats(xs, "summarize"))
    return mean, math.sqrt(var)


def one_sided_ttest_ge(xs: Sequence[float], threshold: float) -> float:
    """p-value of a one-sided one-sample t-test of H0: mean <= threshold against H1: mean > threshold.

    Small p is strong evidence that the true mean exceeds `threshold` (the airbench / modded-nanogpt convention
    for "the record reliably reaches the target"); it equals scipy.stats.ttest_1samp(xs, threshold,
    alternative="greater").pvalue. With zero variance: 0.0 if mean > threshold, else 1.0.
    Raises ValueError if len(xs) < 2.
    """
    values = _as_floats(xs, "one_sided_ttest_ge")
    mean, var = _mean_var(values)
    if var == 0.0:
        return 0.0 if mean > threshold else 1.0
    t_stat = (mean - threshold) / math.sqrt(var / len(values))
    return float(student_t.sf(t_stat, len(values) - 1))


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    Returns {"diff": mean(a) - mean(b), "ci95_low", "ci95_high": two-sided 95% confidence interval of diff,
    "p_value": two-sided p for H0: equal means (equals scipy.stats.ttest_ind(a, b, equal_var=False).pvalue),
    "dof": Welch-Satterthwaite degrees of freedom}.
    With zero variance in both groups: CI = [diff, diff], p = 0.0 if diff != 0 else 1.0, dof = len(a) + len(b) - 2.
    Raises ValueError if either group has fewer than 2 samples.
    """
    xa, xb = _as_floats(a, "welch (a)"), _as_floats(b, "welch (b)")
    mean_a, var_a = _mean_var(xa)
    mean_b, var_b = _mean_var(xb)
    diff = mean_a - mean_b
    se2_a, se2_b = var_a / len(xa), var_b / len(xb)
    if se2_a + se2_b == 0.0:
        return {"diff": diff, "ci95_low": diff, "ci95_high": diff, "p_value": 0.0 if diff != 0.0 else 1.0,
                "dof": float(len(xa) + len(xb) - 2)}
    se = math.sqrt(se2_a + se2_b)
    dof = (se2_a + se2_b) ** 2 / (se2_a**2 / (len(xa) - 1) + se2_b**2 / (len(xb) - 1))
    half_width = float(student_t.ppf(0.975, dof)) * se
    p_value = float(2.0 * student_t.sf(abs(diff) / se, dof))
    return {"diff": diff, "ci95_low": diff - half_width, "ci95_high": diff + half_width, "p_value": p_value,
            "dof": dof}
