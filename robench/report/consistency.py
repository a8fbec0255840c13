"""Check (e), attack consistency: images another attack of its threat model breaks that an ensemble attack misses."""

# An attack that runs others' strongest versions and keeps, per image, whichever breaks it (an
# ensemble: its class declares ``ensemble = True``, e.g. AutoAttack, whose first member is a
# stronger PGD) should break every image a single white-box attack of the same threat model (norm
# and eps) breaks. When it misses more than SHARE of the common images that the other breaks, the
# ensemble is broken or the gradients are masked: a warning. Two attacks neither of which
# contains the other (PGD on cross-entropy and on the CW margin) each break images the other
# misses on healthy models (measured: 1-3% of the digits test set), so for them the counts are
# listed both ways, without a warning. Only registered white-box attacks at the default
# parameters are compared, on the images both attacked; black-box against white-box is check (a).

from __future__ import annotations

from collections import defaultdict
from itertools import combinations

import numpy as np

from robench.report.cells import eps_text, pct
from robench.report.checks import WARNING, per_run
from robench.report.plugins import CLEAN, attack_class, label, white_box
from robench.report.queries import Reported, eps_of, is_default, params, pick
from robench.store import Row, common_examples, on_examples

SHARE = 0.01  # of the common images: more missed by an ensemble attack is a warning
NORMS = {"linf": "L∞", "l2": "L2"}

Checks = dict[tuple[str, str], list[str]]


def threat_groups(rows: list[Row]) -> dict[tuple[str, float], dict[str, Row]]:
    """Registered white-box attacks' rows at default parameters on the test split, per
    (norm, eps): the chosen row of each attack (most examples, newest)."""
    allowed = set(white_box())
    found: dict[tuple[str, float], dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r.key.kind == "attack" and r.key.name in allowed and r.key.name != CLEAN and r.key.split == "test"
                and eps_of(r) is not None and is_default(r)):
            found[(params(r).get("norm", "linf"), round(eps_of(r), 9))][r.key.name].append(r)
    order = white_box()
    return {group: {a: pick(by[a]) for a in order if a in by} for group, by in sorted(found.items())}


def is_ensemble(name: str) -> bool:
    cls = attack_class(name)
    return bool(getattr(cls, "ensemble", False)) if cls is not None else False


def pair_line(a: str, b: str, ra: Row, rb: Row, where: str) -> str | None:
    """The line for one pair of attacks (None: no common images)."""
    start, stop = common_examples([ra, rb])
    m = stop - start
    if m == 0:
        return None
    ok = {a: on_examples(ra, start, stop) > 0.5, b: on_examples(rb, start, stop) > 0.5}
    if is_ensemble(a) != is_ensemble(b):
        strong, weak = (a, b) if is_ensemble(a) else (b, a)
    else:
        strong, weak = sorted((a, b), key=lambda x: ok[x].mean())
    missed = int(np.sum(~ok[weak] & ok[strong]))  # broken by the weak one, not by the strong one
    extra = int(np.sum(ok[weak] & ~ok[strong]))
    s, w = label(strong), label(weak)
    accs = f"{s} {pct(ok[strong].mean())}%, {w} {pct(ok[weak].mean())}% on the first {m} images"
    if is_ensemble(strong) and not is_ensemble(weak):
        if missed > SHARE * m:
            return (f"{WARNING} (e) the ensemble {s} misses {missed} image(s) ({pct(missed / m)}%) that {w} "
                    f"breaks ({where}; {accs}): a broken attack or gradient masking.")
        return f"(e) ok: {s} misses {missed} of the images {w} breaks ({where}; {accs})."
    return (f"(e) {s} and {w} ({where}; {accs}): {extra} broken by {s} only, {missed} by {w} only; "
            f"neither contains the other, so no warning.")


def consistency_checks(wd: Reported) -> Checks:
    """Every reported run's check (e) lines, in report order."""
    out: Checks = {}
    for ds in wd.datasets():
        for d in wd.defenses(ds):
            lines = []
            for (norm, eps), rows in threat_groups(wd.results(ds, d)).items():
                where = f"{NORMS.get(norm, norm)}, ε = {eps_text(eps)}"
                for a, b in combinations(rows, 2):
                    line = pair_line(a, b, rows[a], rows[b], where)
                    if line is not None:
                        lines.append(line)
            out[(ds, d)] = lines or ["(e) not checked: no two white-box attacks at the same norm and ε "
                                     "(at default parameters) share images."]
    return out


def warnings_count(checks: Checks) -> int:
    return sum(line.startswith(WARNING) for lines in checks.values() for line in lines)


def section_consistency(wd: Reported, checks: Checks) -> list[str]:
    lines = ["## Attack consistency", "",
             "(e) For each pair of white-box attacks of one threat model (norm and ε), at the default "
             "parameters and on the images both attacked: the images each one alone breaks. An ensemble "
             "attack (one whose class declares `ensemble = True`) keeps the worst case over attacks at least "
             "as strong as the others, so it should break every image another white-box attack breaks; "
             f"missing more than {pct(SHARE)}% of the images is flagged: evidence of a broken attack or of "
             "gradient masking. Other pairs are listed for information.", ""]
    return lines + per_run(wd, checks)
