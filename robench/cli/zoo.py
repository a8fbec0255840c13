"""The ``robench zoo`` commands: list, show, fetch, verify, add and export published checkpoints."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import click

from robench.cli.options import (Command, check_path, dataset_option, json_option, out_option, path_option,
                                  progress_option, workdir_option)
from robench.errors import UserError


class ZooGroup(click.Group):
    command_class = Command


def _manifests(ctx, param, value):
    return tuple(check_path(v, "--manifest") for v in value)


manifest_option = click.option(
    "--manifest", "manifests", multiple=True, type=click.Path(), callback=_manifests,
    help="Another manifest file to read, repeatable [also: $ROBENCH_ZOO_MANIFESTS, os.pathsep-separated].")


@click.group(name="zoo", cls=ZooGroup)
def zoo() -> None:
    """Published checkpoints: each with its sha256, training settings and measured results."""


def _accuracy(result: dict | None) -> str:
    return "-" if result is None else f"{100 * result['accuracy']:.2f}"


def _where(entry) -> str:
    from robench.zoo.cache import partial_path, where

    found = where(entry)
    try:
        st = os.lstat(partial_path(entry))  # never through a link
    except OSError:
        return found
    if found == "remote" and stat.S_ISREG(st.st_mode):
        return f"remote ({100 * st.st_size / entry.size:.0f}% fetched)"
    return found


@zoo.command(name="list")
@manifest_option
def list_(manifests):
    """List the entries: where each lies (shipped, cached, remote) and its clean and PGD accuracy (%)."""
    from robench.zoo import cache_dir, entries

    found = entries(manifests)
    click.echo(f"zoo cache: {cache_dir()}")
    if not found:
        click.echo("no zoo entries; publish a trained run with: robench zoo add RUN --url URL --manifest FILE")
        return
    rows = [("name", "defense", "dataset", "arch", "where", "clean", "pgd")]
    rows += [(e.name, e.defense, e.dataset, e.arch, _where(e), _accuracy(e.results.get("clean")),
              _accuracy(e.results.get("pgd"))) for e in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@zoo.command()
@click.argument("name")
@json_option("the entry as its manifest holds it")
@manifest_option
def show(name, as_json, manifests):
    """Everything an entry records: settings, hash, URLs, results, and where the local copy is."""
    from robench.zoo import cached_path, get, shipped_path

    e = get(name, manifests)
    if as_json:
        click.echo(json.dumps(e.to_json(), indent=2))
        return
    local = shipped_path(e) if e.shipped else cached_path(e)
    lines = [
        f"name:      {e.name}", f"defense:   {e.defense}", f"dataset:   {e.dataset}",
        f"arch:      {e.arch} ({e.in_channels} channels, {e.num_classes} classes)",
        f"file:      {e.file} ({e.size} bytes)", f"sha256:    {e.sha256}", f"robench:   {e.robench_version}",
        f"where:     {_where(e)} ({local})", f"manifest:  {e.source}",
        "urls:      " + (", ".join(e.urls) or "none"),
        "config:    " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(e.config.items())),
        "objective: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(e.objective.items())),
    ]
    if e.mean is not None:
        lines.append(f"normalise: mean {e.mean}, std {e.std}")
    if e.notes:
        lines.append(f"notes:     {e.notes}")
    lines.append("results:" + ("" if e.results else " none"))
    for key, r in e.results.items():
        ci = f" [{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}]" if r.get("ci95") else ""
        extra = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(r.get("params", {}).items()))
        lines.append(f"  {key}: {_accuracy(r)}%{ci} n={r['n']}" + (f" ({extra})" if extra else ""))
    click.echo("\n".join(lines))


@zoo.command()
@click.argument("names", nargs=-1, required=True)
@progress_option
@manifest_option
def fetch(names, progress, manifests):
    """Download entries into the cache (resumes a broken-off download; installs only a verified
    file). An entry that fails is named, and the others are still fetched."""
    from robench.zoo import get
    from robench.zoo.download import HOW, obtain

    chosen = [get(n, manifests) for n in dict.fromkeys(names)]
    failed = []
    for e in chosen:
        try:
            path, how = obtain(e, progress=progress)
        except UserError as err:
            failed.append(f"{e.name}: {err}")
            continue
        click.echo(f"{e.name}: {HOW[how]}: {path}")
    if failed:
        raise UserError(("; ".join(failed) if len(failed) == 1 else
                         f"{len(failed)} of {len(chosen)} entries failed: " + "; ".join(failed)))


@zoo.command()
@click.argument("names", nargs=-1)
@manifest_option
def verify(names, manifests):
    """Re-hash the local copies (all entries, or NAMES): ok, missing, corrupt or link (a symbolic
    link in the cache, never read). Exit code 1 when a copy is corrupt or a link, or a shipped
    file is missing."""
    from robench.zoo import cached_path, entries, get, shipped_path
    from robench.zoo import verify as check

    chosen = [get(n, manifests) for n in dict.fromkeys(names)] if names else entries(manifests)
    bad = 0
    for e in chosen:
        state = check(e)
        if state == "missing" and not e.shipped:
            click.echo(f"{e.name}: not fetched (robench zoo fetch {e.name})")
            continue
        bad += state != "ok"
        hint = ""
        if state == "link":
            hint = f"; robench never reads a link in its cache: remove it, then robench zoo fetch {e.name}"
        elif state != "ok":
            hint = "; reinstall robench" if e.shipped else f"; fetch it again with: robench zoo fetch {e.name}"
        path = shipped_path(e) if e.shipped else cached_path(e)
        click.echo(f"{e.name}: {state} ({'shipped' if e.shipped else 'cached'} {path}){hint}")
    if bad:
        sys.exit(1)


def resolve_run(what: str, workdir: Path | None, dataset: str | None) -> tuple[Path, Path]:
    """(run directory, workdir of its results) of a run folder, a run name in the workdir, or the
    newest finished run of a defense there."""
    from robench import checkpoint
    from robench.workdir import existing_workdir, find_run, runs_dir

    path = Path(what).expanduser()
    if (path / checkpoint.META).is_file():
        return path, workdir if workdir is not None else path.resolve().parent.parent
    workdir = existing_workdir(workdir)
    if (runs_dir(workdir) / what / checkpoint.META).is_file():
        return runs_dir(workdir) / what, workdir
    return find_run(workdir, what, dataset)[0], workdir


@zoo.command()
@click.argument("run")
@path_option("--manifest", "manifest", required=True,
             help="The manifest file to write the entry to (created if missing; an entry of that name is replaced).")
@click.option("--url", "urls", multiple=True, help="Where the weights file can be downloaded, repeatable (mirrors).")
@click.option("--ship", is_flag=True,
              help="Copy the weights into checkpoints/ beside the manifest (package data for robench's own).")
@click.option("--name", default=None, help="The entry's name [default: DEFENSE-DATASET].")
@dataset_option("With a defense name as RUN: the dataset of its run.")
@click.option("--notes", default="", help="A free-text note stored with the entry.")
@workdir_option
def add(run, manifest, urls, ship, name, dataset, notes, workdir):
    """Publish a finished run (its folder, its name in the workdir, or a defense name): hash its
    weights and write its settings and stored results as a manifest entry."""
    from robench import checkpoint
    from robench.zoo.publish import add_run

    if not urls and not ship:
        raise UserError("give --url URL (where you put the weights file) or --ship")
    run_dir, results_workdir = resolve_run(run, workdir, dataset)
    entry, replaced = add_run(run_dir, results_workdir, manifest, urls, ship, name, notes)
    click.echo(f"{'updated' if replaced else 'added'} {entry.name} in {manifest}: sha256 {entry.sha256[:12]}..., "
               f"{entry.size} bytes, results: {', '.join(entry.results) or 'none'}")
    if not entry.results:
        click.echo(f"note: no results stored for this checkpoint in {results_workdir}; evaluate it "
                   f"(robench eval) and add it again to publish them", err=True)
    weights = run_dir / checkpoint.read_meta(run_dir)["files"]["weights"]["name"]
    for url in urls:
        click.echo(f"upload {weights} to {url}")


@zoo.command()
@click.argument("name")
@out_option("Write the JSON here [default: print it].")
@click.option("--eps", type=float, default=None,
              help="The AutoAttack radius to export (e.g. 0.0313725 for 8/255) [default: the dataset's].")
@manifest_option
@workdir_option
def export(name, out, eps, manifests, workdir):
    """RobustBench-style model info of a zoo entry (or of a run or defense in the workdir): clean
    and AutoAttack accuracy, eps, threat model, architecture, n."""
    from robench import atomic, checkpoint
    from robench.zoo import entry_from_run, get, robustbench_info
    from robench.zoo.publish import stored_rows

    try:
        entry = get(name, manifests)
    except UserError as unknown:
        try:
            run_dir, results_workdir = resolve_run(name, workdir, None)
        except UserError:
            raise unknown from None
        meta = checkpoint.read_meta(run_dir)
        entry = entry_from_run(run_dir, stored_rows(results_workdir, meta["files"]["weights"]["sha256"]),
                               name=f"{meta['defense']}-{meta['dataset']}")
    if out is not None and out.is_dir():
        raise UserError(f"--out {out} is a directory; name the JSON file")
    info = robustbench_info(entry, eps)
    if not info["autoattack_acc"]:
        click.echo(f"note: {entry.name} has no AutoAttack result{f' at eps {eps:g}' if eps else ''}; "
                   f"autoattack_acc is empty (robench eval --attacks autoattack)", err=True)
    text = json.dumps(info, indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        atomic.write_text(out, text)
        click.echo(f"wrote {out}")


COMMANDS = [zoo]
