"""Round against round: the test-split figures with their standard errors, and which differences are noise.

The demo's test split is small (100 pairs), so a figure moves between runs and rounds by chance.
Retrieval recall@k is a share p of n queries: SE sqrt(p (1 - p) / n). CIDEr-D is a mean over the
test images: SE sd / sqrt(n) (`cider_d_se`, capfilt/evaluate.py); attribute accuracy a ratio of
per-caption sums (`recall_se`, capfilt/demo_eval.py). A difference between two rounds has the
standard error sqrt(SE_a^2 + SE_b^2) and is called noise when it is under two of them.
"""

from __future__ import annotations

from typing import Any


# Figure name -> its key in eval.json's retrieval; R@10 beside R@1 because at the demo's budget R@1
# counts a handful of hits of 100, R@10 enough of them to show a change.
RETRIEVAL = (("TR@1", "i2t_r1"), ("IR@1", "t2i_r1"), ("TR@10", "i2t_r10"), ("IR@10", "t2i_r10"))


def proportion_se(p: Any, n: Any) -> float | None:
    """sqrt(p (1 - p) / n): the standard error of a share p of n (a recall@k over n queries)."""
    return float((p * (1.0 - p) / n) ** 0.5) if isinstance(p, (int, float)) and isinstance(n, int) and n > 0 else None


def round_figures(res: dict) -> dict[str, tuple[float | None, float | None]]:
    """{name: (value, standard error)} of a round's test-split figures, as the headline prints them."""
    out: dict[str, tuple[float | None, float | None]] = {}
    retrieval = res.get("retrieval", {})
    itm = retrieval.get("itm", {})
    if itm:
        for name, key in RETRIEVAL:
            if key in itm:
                out[name] = (itm[key], proportion_se(itm[key], retrieval.get("n")))
    cap = res.get("captioning", {})
    if cap:
        out["CIDEr"] = (cap.get("cider_d"), cap.get("cider_d_se"))
        out["BLEU-4"] = (cap.get("bleu_4"), None)  # a corpus figure: no per-image mean to take an SE of
        attributes = cap.get("attributes", {})
        out["attributes"] = (attributes.get("recall"), attributes.get("recall_se"))
    return out


def with_se(value: Any, se: float | None) -> str:
    return (f"{value:.3f}" if isinstance(value, (int, float)) else "n/a") + (f" ± {se:.3f}" if se is not None else "")


def compare(new: dict, old: dict) -> list[dict[str, Any]]:
    """Each figure of two rounds: the difference, its standard error (the rounds' SEs combined as if
    independent; both use the same test images, which makes the true one smaller, so this errs
    towards calling a difference noise) and `noise` when |difference| < 2 SE."""
    rows = []
    before = round_figures(old)
    for name, (value, se) in round_figures(new).items():
        value0, se0 = before.get(name, (None, None))
        if not isinstance(value, (int, float)) or not isinstance(value0, (int, float)):
            continue
        diff = value - value0
        se_diff = (se**2 + se0**2) ** 0.5 if se is not None and se0 is not None else None
        rows.append({"figure": name, "before": value0, "after": value, "difference": diff, "se": se_diff,
                     "noise": None if se_diff is None else abs(diff) < 2 * se_diff})
    return rows


def compare_line(new: dict, old: dict) -> str:
    parts = []
    for row in compare(new, old):
        verdict = "" if row["noise"] is None else (" (within noise)" if row["noise"] else
                                                   " (gain)" if row["difference"] > 0 else " (loss)")
        se = f" ± {row['se']:.3f}" if row["se"] is not None else ""
        parts.append(f"{row['figure']} {row['difference']:+.3f}{se}{verdict}")
    return (f"round {new.get('round')} vs round {old.get('round')} (difference ± its SE; within noise when "
            f"|difference| < 2 SE): " + ", ".join(parts))
