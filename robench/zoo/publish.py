"""Publishing: a trained run and its stored results become a zoo entry, or RobustBench model info."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

from robench import checkpoint
from robench.errors import UserError
from robench.store import Row
from robench.zoo.manifest import Entry, check_name, check_url

AUTOATTACK = "autoattack"


def stored_rows(workdir: Path, sha: str) -> list[Row]:
    """The results a workdir stores for one checkpoint ([] without a results database)."""
    from robench.store import DB_NAME, Store

    if not (workdir / DB_NAME).is_file():
        return []
    with Store.in_workdir(workdir) as store:
        return store.rows(checkpoint=sha)


def add_run(run_dir: Path, results_workdir: Path, manifest: Path, urls: Sequence[str] = (), ship: bool = False,
            name: str | None = None, notes: str = "") -> tuple[Entry, bool]:
    """Publish a finished run into ``manifest`` (``robench zoo add``): its weights' hash and
    settings and the results ``results_workdir`` stores for it; with ``ship``, the weights are
    copied into ``checkpoints/`` beside the manifest. Returns the entry and whether it replaced one
    of the same name. An entry name that another manifest already uses is refused."""
    import shutil

    from robench import atomic
    from robench.zoo.manifest import _same_file, manifest_paths, read_manifest, write_manifest

    if not urls and not ship:
        raise UserError("give --url URL (where you put the weights file) or --ship")
    if manifest.exists() and not manifest.is_file():
        raise UserError(f"--manifest {manifest} is not a file")
    meta = checkpoint.read_meta(run_dir)
    rows = stored_rows(results_workdir, meta["files"]["weights"]["sha256"])
    entry = entry_from_run(run_dir, rows, urls, name=name, shipped=ship, notes=notes)
    others = [p for p in manifest_paths() if not _same_file(p, manifest)]
    for e in (e for path in others if Path(path).is_file() for e in read_manifest(path)):
        if e.name == entry.name:
            raise UserError(f"zoo entry {entry.name!r} already exists in {e.source}; pass another --name")
    current = read_manifest(manifest) if manifest.exists() else []
    replaced = any(e.name == entry.name for e in current)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    if ship:
        weights = run_dir / meta["files"]["weights"]["name"]
        target = manifest.parent / "checkpoints" / entry.file
        target.parent.mkdir(exist_ok=True)
        atomic.write_with(target, lambda p: shutil.copyfile(weights, p))
    write_manifest(manifest, [*(e for e in current if e.name != entry.name), entry])
    return entry, replaced


def entry_from_run(run_dir: Path, rows: Sequence[Row], urls: Sequence[str] = (), name: str | None = None,
                   shipped: bool = False, notes: str = "", reference: dict[str, str] | None = None) -> Entry:
    """The entry of a finished run: its weights' hash and size, every training setting, and the
    results stored for its checkpoint (``results_for``). The weights file is checked against the
    run's record first."""
    meta = checkpoint.read_meta(run_dir)
    if not meta.get("finished"):
        raise UserError(f"run {run_dir} is not finished (step {meta['step']}/{meta['config'].get('steps', '?')}); "
                        f"finish training it before publishing it")
    weights = run_dir / meta["files"]["weights"]["name"]
    if not weights.is_file():
        raise UserError(f"checkpoint file {weights} is missing")
    digest = checkpoint.sha256(weights)
    if digest != meta["files"]["weights"]["sha256"]:
        raise UserError(f"checkpoint file {weights} is corrupted: sha256 {digest[:12]}... does not match the "
                        f"recorded {meta['files']['weights']['sha256'][:12]}...")
    name = check_name(name or f"{meta['defense']}-{meta['dataset']}")
    return Entry(
        name=name, defense=meta["defense"], dataset=meta["dataset"], arch=meta["arch"],
        in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"]), sha256=digest,
        size=weights.stat().st_size, file=f"{name}.safetensors",
        robench_version=meta.get("versions", {}).get("robench", "?"), classes=list(meta.get("classes") or []),
        image_size=meta.get("image_size"), config=meta["config"], objective=meta.get("objective", {}),
        urls=[check_url(u, "--url") for u in urls], shipped=shipped, results=results_for(run_dir, meta, rows),
        reference=dict(reference or {}), notes=notes,
    )


def results_for(run_dir: Path, meta: dict, rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """For each attack and radius measured on the test split at the attack's default parameters,
    the row with the most examples (the report's choice), keyed by the attack's name at the
    dataset's default radius, ``ATTACK@EPS`` at any other, and ``ATTACK@l2:EPS`` under the L2
    threat model."""
    from robench.report.queries import Run, default_eps, eps_of, is_default, norm_of, params, pick, same

    sha = meta["files"]["weights"]["sha256"]
    eps0 = default_eps(Run(run_dir, meta))
    groups: dict[str, list[Row]] = {}
    for row in rows:
        k = row.key
        if k.checkpoint != sha or k.kind != "attack" or k.split != "test" or k.dataset != meta["dataset"]:
            continue
        if not is_default(row):
            continue
        eps, norm = eps_of(row), norm_of(row)
        if norm != "linf":  # the L2 results under their own names, never beside the L-inf ones
            key = f"{k.name}@l2:{eps:g}"
        else:
            key = k.name if eps is None or same(eps, eps0) else f"{k.name}@{eps:g}"
        groups.setdefault(key, []).append(row)
    out = {}
    for key in sorted(groups):
        row = pick(groups[key])
        out[key] = {"accuracy": float(row.value), "ci95": list(row.ci) if row.ci else None, "n": int(row.key.n),
                    "params": params(row), "split": row.key.split, "examples": row.key.examples,
                    "data": row.key.data, "measured": row.created}
    return out


def robustbench_info(entry: Entry, eps: float | None = None) -> dict[str, Any]:
    """RobustBench's model-info JSON (``model_info/<dataset>/<threat model>/<Name>.json``):
    accuracies in % as strings with two decimals, as their files hold them; what robench does not
    know (paper, authors, venue, the paper's own number) is left empty unless the entry's
    ``reference`` gives it. Extra keys: ``threat_model``, ``n`` and ``robench`` (provenance)."""
    clean = entry.results.get("clean")
    attack = _autoattack(entry, eps)
    radius = _eps_of(attack) if attack else eps if eps is not None else entry.objective.get("eps")
    ref = entry.reference
    n = (attack or clean or {}).get("n")
    notes = []
    if radius is not None and not _eps_label(radius).endswith("/255"):
        notes.append(f"Uses \\(\\ell_\\infty\\) = {radius:g} \u2248 {radius * 255:.2f}/255.")
    if attack and clean and attack["n"] != clean["n"]:
        notes.append(f"Clean accuracy on {clean['n']} and AutoAttack on {attack['n']} test images.")
    elif n:
        notes.append(f"Evaluated on {n} test images by robench {entry.robench_version}.")
    return {
        "link": ref.get("link", ""), "name": ref.get("title", ""), "authors": ref.get("authors", ""),
        "additional_data": False, "number_forward_passes": 1, "dataset": entry.dataset,
        "venue": ref.get("venue", ""), "architecture": _arch_label(entry.arch),
        "eps": _eps_label(radius) if radius is not None else "",
        "clean_acc": _percent(clean), "reported": ref.get("reported", ""), "autoattack_acc": _percent(attack),
        "footnote": " ".join(notes), "threat_model": "Linf", "n": n,
        "robench": {"entry": entry.name, "defense": entry.defense, "sha256": entry.sha256,
                    "clean_ci95": _ci(clean), "autoattack_ci95": _ci(attack)},
    }


def _autoattack(entry: Entry, eps: float | None) -> dict | None:
    found = {k: r for k, r in entry.results.items() if k.split("@")[0] == AUTOATTACK}
    if eps is None:
        return found.get(AUTOATTACK)
    return next((r for r in found.values() if _eps_of(r) is not None and math.isclose(_eps_of(r), eps,
                                                                                      rel_tol=1e-6)), None)


def _eps_of(result: dict) -> float | None:
    eps = result.get("params", {}).get("eps")
    return None if eps is None else float(eps)


def _eps_label(eps: float) -> str:
    """``8/255`` when eps is a whole number of 255ths (as RobustBench writes it), else the number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and round(k) > 0 else f"{eps:g}"


def _arch_label(arch: str) -> str:
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    return f"WideResNet-{m[1]}-{m[2]}" if m else arch


def _percent(result: dict | None) -> str:
    return "" if result is None else f"{100 * result['accuracy']:.2f}"


def _ci(result: dict | None) -> list[float] | None:
    return None if result is None or result.get("ci95") is None else [round(100 * v, 2) for v in result["ci95"]]
