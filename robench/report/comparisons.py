"""The report's paired comparisons: each defense against its parent, each ablation chain's end against its root."""

from __future__ import annotations

from robench.comparison import ALPHA, Paired, diff_text, p_text, paired_rows
from robench.report.cells import dataset_label, eps_text, md_table
from robench.report.plugins import CLEAN, ablation_chains, attack_order, label
from robench.report.queries import Reported, default_eps, table1_rows


def comparison_pairs() -> list[tuple[str, str]]:
    """(defense, reference) from the plugins' metadata: every chain's end against its root (the
    whole change), then each defense against its declared ``parent`` (one change), in chain order."""
    pairs: list[tuple[str, str]] = []
    for chain in ablation_chains():
        if len(chain) > 2:
            pairs.append((chain[-1], chain[0]))
        pairs += [(child, parent) for parent, child in zip(chain, chain[1:])]
    return list(dict.fromkeys(pairs))


def pair_results(wd: Reported, ds: str, a: str, b: str) -> dict[str, Paired]:
    """Clean and every attack at the dataset's default eps and parameters that both reported
    runs have, compared on the examples both measured."""
    rows_a, rows_b = table1_rows(wd, ds, a), table1_rows(wd, ds, b)
    out = {}
    for name in rows_a:
        if name in rows_b and (stats := paired_rows(rows_a[name], rows_b[name])) is not None:
            out[name] = stats
    return out


def cell(stats: Paired | None) -> str:
    if stats is None:
        return "—"
    text = f"{diff_text(stats)}, p = {p_text(stats.p)}, n = {stats.n}"
    return f"**{text}**" if stats.significant() else text


def section_comparisons(wd: Reported) -> list[str]:
    lines = ["## Paired comparisons", "",
             "Each defense against the defense it ablates (its declared `parent`) and each ablation chain's "
             "last defense against its first, on the same test images at the dataset's default ε and attack "
             "parameters. A cell is the difference in accuracy points (first minus second) with Newcombe's "
             "95% interval for paired proportions (method 10), the exact McNemar p-value and the number of "
             f"images both were evaluated on; bold: p < {ALPHA:g}. `robench compare --defense A,B` prints "
             "the discordant counts and the images needed to resolve each difference.", ""]
    pairs = comparison_pairs()
    any_table = False
    for ds in wd.datasets():
        present = [(a, b) for a, b in pairs if (ds, a) in wd.runs and (ds, b) in wd.runs]
        if not present:
            continue
        results = {pair: pair_results(wd, ds, *pair) for pair in present}
        names = set().union(*results.values())
        columns = [c for c in [CLEAN, *attack_order()] if c in names] + sorted(names - {CLEAN, *attack_order()})
        if not columns:
            continue
        any_table = True
        eps = default_eps(wd.runs[(ds, present[0][0])])
        body = [[f"{a} vs {b}", *(cell(results[(a, b)].get(c)) for c in columns)] for a, b in present]
        lines += [f"### {dataset_label(ds)}, ε = {eps_text(eps)}", ""]
        lines += md_table(["pair", *(label(c) for c in columns)], body)
    if not any_table:
        return lines + ["No defense has been evaluated together with its declared parent on one dataset "
                        "yet (see Missing pieces).", ""]
    return lines
