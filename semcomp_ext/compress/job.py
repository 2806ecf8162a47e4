"""A compression job: the output folder's lock and rules (empty / --resume / --overwrite), the
codec fitted once, the tasks run on an engine with every finished task journaled, and the
manifest kept current (in_progress until the end, then complete)."""

from __future__ import annotations

import os
import sys

from . import atomic, fsio, manifest
from .codecs import fit_codec, parse_codec
from .lock import LOCK, OutputLock, stale_note
from .options import CompressOptions, OptionError, OptionStateError
from .plan import Plan, build_plan, sources
from .progress import Progress

_WRITTEN = ("centroids", "metadata", "concepts", ".spill", manifest.INDEX_DIR)  # folders a job writes into
_OURS = _WRITTEN + (manifest.MANIFEST, manifest.JOURNAL)


def _prepare_out(opts: CompressOptions) -> dict | None:
    """Apply the empty / --resume / --overwrite rules; return the old manifest on resume."""
    out = opts.out
    if fsio.is_url(out):
        fsio.refresh(out)
        names = fsio.listdir(out) if fsio.isdir(out) else []
    else:
        names = os.listdir(out) if os.path.isdir(out) else []
    names = [n for n in names if n != LOCK]  # this job's own lock
    if names:
        if opts.resume:
            if not fsio.exists(manifest.manifest_path(out)):
                raise OptionStateError("resume", f": {out} has no {manifest.MANIFEST}; nothing to resume")
            atomic.remove_tmp_files(out)
            return manifest.load_state(out)
        if not opts.overwrite:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue or --overwrite to replace it")
        foreign = [n for n in names if n not in _OURS]
        if foreign:
            # refuse to delete files we did not write (a mistyped --out must not wipe a folder)
            raise OptionStateError("overwrite", f": {out} holds files semcomp did not write ({foreign[:3]}); remove them yourself")
        for n in _OURS:
            atomic.rmtree_if_exists(fsio.join(out, n))
    fsio.makedirs(out)
    return None


def default_workers() -> int:
    """The cores this process may run on (affinity / cgroup cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _codec_entry(plan: Plan, old: dict | None, quiet: bool = True) -> dict:
    """The manifest entry of the storage codec. On --resume it is the interrupted run's (same
    parameters, already fitted), so resumed shards are encoded exactly like the first ones;
    otherwise a codec that needs fitting is fitted now, before any shard is written, on the
    first codec_sample_rows rows of centroid + RFS output (pairs-mode rows, in either mode)."""
    if old is not None and "codec" in old:
        return old["codec"]
    p = plan.params
    codec = parse_codec(p["codec"], seed=p["seed"])
    if codec.needs_fit:
        from .pipeline import codec_sample

        fit_codec(codec, codec_sample(plan, p["codec_sample_rows"]), quiet=quiet)  # lines every 10 s, real time
    else:
        codec.dim = p["keep"]
    return codec.to_manifest()


def _files_present(out: str, rec: dict, sizes: dict | None = None) -> bool:
    """A journal record is trusted if its files exist with the recorded sizes (a stat, no
    hashing: `semcomp verify` re-hashes). `sizes`: relative path -> size from one listing of
    a URL output."""
    for key in ("centroids", "metadata", "concepts"):
        f = rec.get(key)
        if f:
            if sizes is not None:
                if sizes.get(f["file"]) != f["bytes"]:
                    return False
                continue
            try:
                if os.path.getsize(os.path.join(out, f["file"])) != f["bytes"]:
                    return False
            except OSError:
                return False
    return True


def compress(opts: CompressOptions) -> dict:
    """Run (or resume) a compression job; returns the final manifest."""
    import gc

    # The objects that exist before the job (torch's import alone makes ~170k) are set aside
    # from the cyclic garbage collector for its duration: each full collection walked all of
    # them, 0.1 s apiece, several times a job. Objects the job creates are collected as usual;
    # a process that froze objects itself is left as it is.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return _compress(opts)
    finally:
        if freeze:
            gc.unfreeze()


def _compress(opts: CompressOptions) -> dict:
    import dataclasses

    opts.validated()
    fsio.configure(opts.storage_options)
    opts = dataclasses.replace(opts, out=fsio.local(opts.out))
    from .device import resolve_device

    device = resolve_device(getattr(opts, "device", "cpu"), opts.engine)  # before any input is opened
    # validates every input before touching the output folder; the block backend chosen here
    plan = build_plan(opts, device=None if device.type == "cpu" else str(device))
    if plan.in_dtype == "float64" and not opts.quiet:
        print(f"semcomp compress: note: the inputs are float64; they are cast to float32 block by block "
              f"(accumulation is float32) and stored as {plan.params['codec']}", file=sys.stderr)
    lock = OutputLock(opts.out).acquire()  # before the folder is looked at: one job at a time
    try:
        note = stale_note(lock)
        if note and not opts.quiet:
            print(f"semcomp compress: note: {opts.out}: {note}", file=sys.stderr)
        if not fsio.is_url(opts.out):
            manifest.refuse_symlinks(opts.out, _WRITTEN)
        return _run_job(opts, plan)
    finally:
        lock.release_soon()


def _run_job(opts: CompressOptions, plan: Plan) -> dict:
    old = _prepare_out(opts)
    n_in = len(plan.mods[0]["shards"])
    m = {
        "format": manifest.FORMAT, "library_version": plan.extra["version"], "status": "in_progress",
        "parameters": plan.params, "rfs": plan.extra["rfs"], "sources": sources(plan),
        "num_shards": plan.partitions if plan.concepts else n_in, "shards": [], "maps": [],
    }
    if old is not None:
        _resume_from(opts, plan, old, m)
    m["codec"] = plan.extra["codec"] = _codec_entry(plan, old, opts.quiet)
    manifest.save(opts.out, m)  # in_progress, the records resumed from folded in
    manifest.remove_journal(opts.out)  # ... so the journal restarts empty
    _run_tasks(opts, plan, m, _runner(opts))
    return _finish(opts, plan, m)


def _resume_from(opts: CompressOptions, plan: Plan, old: dict, m: dict) -> None:
    """Check the interrupted run's parameters and inputs against this one's; fold in its
    committed records whose files are still there (sizes only: verify re-hashes)."""
    diff = sorted(k for k in set(m["parameters"]) | set(old.get("parameters", {}))
                  if m["parameters"].get(k) != old.get("parameters", {}).get(k))
    po = old.get("parameters", {})
    if "batch_size" in diff and m["parameters"]["mode"] == "pairs":
        # pairs mode: each output row depends on its input row only, never on the blocking,
        # so the files are the same whatever --batch-size; the first run's value is kept
        m["parameters"] = dict(plan.params, batch_size=po.get("batch_size"))  # the job itself uses the new one
        diff.remove("batch_size")
    if "skip_invalid" in diff and plan.params["skip_invalid"] and not po.get("skip_invalid"):
        # a run without --skip-invalid stops at the first NaN/Inf, so every shard it committed
        # has no invalid row and is exactly what --skip-invalid writes: resume with it
        m["parameters"]["skip_invalid"] = True
        diff.remove("skip_invalid")
    if diff:
        raise OptionError("resume", f": parameters differ from the interrupted run: {diff}")
    if old.get("sources") != m["sources"]:
        raise OptionError("resume", ": the input files changed since the interrupted run (paths, rows, sizes or mtimes)")
    # trust the committed records whose files are still there (sizes only; verify re-hashes)
    sizes = fsio.sizes_under(opts.out) if fsio.is_url(opts.out) else None
    spilled = (lambda rel: rel in sizes) if sizes is not None else \
        (lambda rel: os.path.exists(os.path.join(opts.out, rel)))
    m["shards"] = [s for s in old.get("shards", []) if _files_present(opts.out, s, sizes)]
    m["maps"] = [r for r in old.get("maps", []) if all(spilled(os.path.join(
        ".spill", f"s{r['index']:05d}", f"p{q:05d}.npz")) for q in range(plan.partitions))]


def _runner(opts: CompressOptions):
    """runner(fn, plan, items, on_done): the engine that runs the shard tasks."""
    if opts.engine == "local":
        from .engines import run_local

        workers = default_workers() if opts.workers is None else opts.workers
        runner = lambda fn, p, items, cb: run_local(fn, p, items, cb, workers)  # noqa: E731
    elif opts.engine == "ray":
        from .engines import require_ray, run_ray

        require_ray()
        runner = lambda fn, p, items, cb: run_ray(fn, p, items, cb, opts.ray_address, opts.workers)  # noqa: E731
    return runner


def _run_tasks(opts: CompressOptions, plan: Plan, m: dict, runner) -> None:
    """Every task not committed yet, phase by phase; each record journaled as it arrives."""
    from .pipeline import concept_map_task, concept_reduce_task, pair_task

    n_in = len(plan.mods[0]["shards"])
    in_bytes = [sum(mm["shards"][i]["size"] for mm in plan.mods) for i in range(n_in)]
    in_rows = [s["rows"] for s in plan.mods[0]["shards"]]
    bar = Progress(sum(in_bytes), n_in + (plan.partitions if plan.concepts else 0), opts.quiet)
    journal = manifest.Journal(opts.out)

    def done(key):
        def cb(rec):
            journal.append(key, rec)  # O(1) durable commit; folded into manifest.json at the end
            m[key].append(rec)
            reduce = key == "shards" and plan.concepts
            bar.update(0 if reduce else in_bytes[rec["index"]], rows=0 if reduce else in_rows[rec["index"]])
        return cb

    try:
        phases = [(concept_map_task, "maps", n_in), (concept_reduce_task, "shards", plan.partitions)] \
            if plan.concepts else [(pair_task, "shards", n_in)]
        for fn, key, n in phases:
            finished = {r["index"] for r in m[key]}
            todo = [i for i in range(n) if i not in finished]
            if key == "maps" or not plan.concepts:
                bar.skip(sum(in_bytes[i] for i in finished), len(finished), sum(in_rows[i] for i in finished))
            else:
                bar.update(0, len(finished))
            runner(fn, plan, todo, done(key))
    finally:
        journal.close()
        bar.close()


def _finish(opts: CompressOptions, plan: Plan, m: dict) -> dict:
    """Fold the records into the complete manifest (durable before the journal goes)."""
    for key in ("shards", "maps"):
        m[key].sort(key=lambda r: r["index"])
    m["rows_in"] = sum(s["rows"] for s in plan.mods[0]["shards"])
    m["rows_out"] = sum(s["rows"] for s in m["shards"])
    src = m["maps"] if plan.concepts else m["shards"]
    m["invalid_rows_skipped"] = sum(r["invalid_rows"] for r in src)
    if plan.concepts:
        m["num_concepts"] = m["rows_out"]
        atomic.rmtree_if_exists(fsio.join(opts.out, ".spill"))
    m["status"] = "complete"
    manifest.save(opts.out, m)
    manifest.remove_journal(opts.out)  # folded in: the complete manifest is durable
    return m
