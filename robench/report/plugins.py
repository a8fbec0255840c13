"""What the report knows about defenses and attacks, read from the plugin classes' metadata."""

from __future__ import annotations

from typing import Iterable

from robench.registry import ATTACKS, DEFENSES

CLEAN = "clean"  # the clean-accuracy row: stored like an attack, but no attack plugin


def attack_class(name: str) -> type | None:
    """The registered attack class, or None (clean, or an attack no longer registered)."""
    return ATTACKS.get(name) if name != CLEAN and name in ATTACKS else None


def label(name: str) -> str:
    """Column heading of an attack (or of clean accuracy); the name itself when unknown."""
    cls = attack_class(name)
    return (cls.label or name) if cls is not None else name


def column_labels() -> dict[str, str]:
    """Clean and every registered attack, in table order, with their headings."""
    return {CLEAN: label(CLEAN), **{a: label(a) for a in attack_order()}}


def attack_order() -> list[str]:
    """Registered attacks in their declared table order."""
    return ATTACKS.ordered()


def paper_attacks() -> list[str]:
    """The paper's Table 1 attacks: a missing one is listed as missing."""
    return [a for a in attack_order() if ATTACKS.get(a).paper]


def white_box() -> list[str]:
    return [a for a in attack_order() if not ATTACKS.get(a).black_box]


def black_box() -> list[str]:
    return [a for a in attack_order() if ATTACKS.get(a).black_box]


def sweep_attack() -> str:
    """The attack swept over eps (the accuracy-vs-eps curve and the large-eps check)."""
    order = attack_order()
    return next((a for a in order if ATTACKS.get(a).eps_curve), order[0])


def defense_order() -> list[str]:
    """Registered defenses in their declared table order."""
    return DEFENSES.ordered()


def ordered(defenses: Iterable[str]) -> list[str]:
    """``defenses`` in table order; names no longer registered last, sorted."""
    names = set(defenses)
    known = [d for d in defense_order() if d in names]
    return known + sorted(names - set(known))


def ablation_chains() -> list[tuple[str, ...]]:
    """Each chain of defenses linked by their ``parent``, root first, one per chain end, in
    table order of the ends."""
    order = defense_order()
    parents = {d: DEFENSES.get(d).parent for d in order}
    has_child = {p for p in parents.values() if p is not None}
    chains = []
    for end in order:
        if parents[end] is None or end in has_child:
            continue
        chain = [end]
        while (parent := parents.get(chain[0])) is not None and parent not in chain:
            chain.insert(0, parent)
        chains.append(tuple(chain))
    return chains


def colors() -> dict[str, str]:
    """One fixed colour per registered defense, so every figure agrees."""
    return {d: f"C{i}" for i, d in enumerate(defense_order())}
