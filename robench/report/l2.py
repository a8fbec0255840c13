"""The report's L2 section: results in the L2 threat model, never mixed with the L-inf ones."""

from __future__ import annotations

from robench.config import L2_SOURCES
from robench.registry import ATTACKS
from robench.report.cells import dataset_label, eps_text, md_table, pct
from robench.report.plugins import CLEAN, attack_order, label
from robench.report.queries import Reported, eps_series, l2_eps, norm_of, same, table1_rows
from robench.report.sections import accuracy_table, other_settings_table

L2 = "l2"


def l2_attacks() -> list[str]:
    """Registered attacks that implement the L2 threat model, in table order."""
    return [a for a in attack_order() if L2 in ATTACKS.get(a).norms]


def has_l2(wd: Reported, ds: str) -> bool:
    return any(r.key.kind == "attack" and norm_of(r) == L2 for d in wd.defenses(ds) for r in wd.results(ds, d))


def section_l2(wd: Reported) -> list[str]:
    lines = ["## L2 threat model", "",
             "Robust accuracy with ||x_adv − x||₂ ≤ ε per image, inputs in [0, 1] (`robench eval --norm l2`). "
             "The paper evaluates L∞ only; every other table, the worst case, the ablation, the ε curve and "
             "the masking checks are L∞, and no L2 result enters them.", ""]
    datasets = [ds for ds in wd.datasets() if has_l2(wd, ds)]
    if not datasets:
        example = wd.defenses(wd.datasets()[0])[0] if wd.runs else "DEFENSE"
        core = [a for a in l2_attacks() if ATTACKS.get(a).core]  # the catalogue's ta.* too long to list
        return lines + ["No L2 results stored; e.g. `robench eval --defense "
                        f"{example} --norm l2 --attacks {','.join(core)}`.", ""]
    for ds in datasets:
        lines += l2_for(wd, ds)
    return lines


def l2_for(wd: Reported, ds: str) -> list[str]:
    eps = l2_eps(ds)
    lines: list[str] = []
    if eps is not None:
        lines += [f"### {dataset_label(ds)}, L2 ε = {eps_text(eps)}", "",
                  f"Default L2 radius: {L2_SOURCES.get(ds, eps_text(eps))}.", ""]
        per = {d: table1_rows(wd, ds, d, L2) for d in wd.defenses(ds)}
        lines += accuracy_table(per, []) if any(set(rows) - {CLEAN} for rows in per.values()) else \
            [f"No L2 result at ε = {eps_text(eps)} (`robench eval --dataset {ds} --norm l2` uses it).", ""]
    else:
        lines += [f"### {dataset_label(ds)}, L2", "",
                  "No paper gives a default L2 radius for this dataset; the radii measured are listed below.", ""]
    body = []
    for d in wd.defenses(ds):
        rows = wd.results(ds, d)
        for attack in attack_order():
            series = {e: r for e, r in eps_series(rows, attack, L2).items() if not same(e, eps)}
            if series:
                body.append([d, label(attack), ", ".join(f"{eps_text(e)}: {pct(r.value)} (n={r.key.n})"
                                                         for e, r in series.items())])
    if body:
        lines += [f"Other L2 radii, {dataset_label(ds)} (default attack parameters):", "",
                  *md_table(["defense", "attack", "L2 ε: accuracy %"], body)]
    return lines + other_settings_table(wd, ds, L2)

