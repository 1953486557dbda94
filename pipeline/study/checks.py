"""Can a study's protocol break a model at all? The checks asked of every table.

* the standard model's headline metric (accuracy; Dice) under PGD at the largest L2 radius is at most 5%;
* no metric under attack exceeds the clean one;
* white noise of the largest radius costs far less than PGD of the same norm and radius.

(Degenerate models are judged by the evaluation itself, ``pipeline.evaluation.degenerate``.)
"""

from __future__ import annotations

BROKEN = 0.05             # the standard model's headline metric under the largest L2 radius
NOISE_SHARE = 0.5         # noise may cost at most this fraction of what PGD costs
MIN_PGD_DROP = 0.05       # below this PGD drop the noise comparison says nothing


def protocol_checks(rows: list[dict], headline: str) -> list[str]:
    """One line per check, starting with PASS, FAIL or n/a, over the per-variant curves.

    ``rows``: per variant ``{"variant", "method", "clean", "curves": {(attack, norm): [(eps, value), ...]}}``.
    """
    lines = []
    standard = [r for r in rows if r["method"] == "standard" and r["curves"].get(("pgd", "L2"))]
    if not standard:
        lines.append("n/a  standard model broken: no standard variant evaluated under L2 PGD")
    for r in standard:
        eps, value = r["curves"][("pgd", "L2")][-1]
        verdict = "PASS" if value <= BROKEN else "FAIL"
        lines.append(f"{verdict} standard model broken: '{r['variant']}' {headline} {value:.4f} under PGD L2 "
                     f"eps {eps:g} (at most {BROKEN:g})")
    above = [f"{r['variant']} {attack}-{norm}@{eps:g} {value:.4f} > {r['clean']:.4f}"
             for r in rows for (attack, norm), points in r["curves"].items() for eps, value in points
             if value > r["clean"] + 1e-9]
    lines.append("PASS no metric under attack above the clean one" if not above else
                 "FAIL metric under attack above the clean one: " + "; ".join(above))
    for r in rows:
        for (attack, norm), points in sorted(r["curves"].items()):
            noise = dict(r["curves"].get(("noise", norm), []))
            if attack != "pgd" or not points or points[-1][0] not in noise:
                continue
            eps, pgd_value = points[-1]
            pgd_drop, noise_drop = r["clean"] - pgd_value, r["clean"] - noise[eps]
            if pgd_drop < MIN_PGD_DROP:
                lines.append(f"n/a  noise weaker than PGD: '{r['variant']}' {norm} eps {eps:g}: PGD costs only "
                             f"{pgd_drop:.4f}")
                continue
            verdict = "PASS" if noise_drop <= NOISE_SHARE * pgd_drop else "FAIL"
            lines.append(f"{verdict} noise weaker than PGD: '{r['variant']}' {norm} eps {eps:g}: noise costs "
                         f"{noise_drop:.4f}, PGD {pgd_drop:.4f} (noise at most {NOISE_SHARE:g} x PGD)")
    return lines
