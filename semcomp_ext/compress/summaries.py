"""The reports people read: `compress`'s summary (rows, bytes, the ratio over every stored
byte) and `eval`'s table."""

from __future__ import annotations


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def stored_ratio(m: dict) -> float:
    """Input bytes / every stored byte. Pairs mode: per item, M x D values of the input dtype
    against one code plus the codebook shared by all rows (a fitted codec's, stored in the
    manifest). Concepts mode: the input files' bytes against the centroid and concept-id files'
    plus the codebook (rows become concepts: no per-item ratio)."""
    from .api import codebook_bytes, compression_ratio_bytes
    from .codecs import codec_from_manifest

    p = m["parameters"]
    codec = codec_from_manifest(m)
    if p["mode"] == "pairs":
        return compression_ratio_bytes(len(p["modalities"]), p["dim"], p["in_dtype"], codec, p["keep"],
                                       rows=m.get("rows_out"))
    src = sum(s["bytes"] for s in m["sources"] if s["modality"] in p["modalities"])
    dst = sum(sh[k]["bytes"] for sh in m["shards"] for k in ("centroids", "concepts") if sh.get(k))
    return src / max(dst + codebook_bytes(codec), 1)


def compress_summary(m: dict, out: str, seconds: float | None = None) -> str:
    """A few lines for people: where, rows, bytes and the compression ratio (real dtypes,
    every stored byte counted: codes and codebook)."""
    from .api import codebook_bytes
    from .codecs import codec_from_manifest

    p = m["parameters"]
    codec = codec_from_manifest(m)
    mods = p["modalities"]
    src = sum(s["bytes"] for s in m["sources"] if s["modality"] in mods)
    book = codebook_bytes(codec)
    dst = sum(sh[k]["bytes"] for sh in m["shards"] for k in ("centroids", "concepts") if sh.get(k)) + book
    ratio = stored_ratio(m)
    item_in = f"{len(mods)} x {p['dim']} {p['in_dtype']}"
    item_out = f"{p['keep']} {codec.name}" + (f" ({codec.bytes_per_vector(p['keep']):g} B)" if codec.name not in
                                              ("float32", "float16") else "")
    with_book = f" + a {_size(book)} codebook" if book else ""
    drop = f" (drop rate {p['drop_rate']:g})" if p.get("drop_rate") else ""
    if p["mode"] == "concepts":
        shape = (f"  rows -> concepts: {m['rows_in']:,} rows of {item_in} -> {m['rows_out']:,} concepts of "
                 f"{item_out}{with_book}: stored bytes {ratio:.2f}x smaller{drop}")
    else:
        shape = f"  per item: {item_in} -> {item_out}{with_book}: {ratio:.2f}x smaller{drop}"
    what = "concepts" if p["mode"] == "concepts" else "rows"
    lines = [
        f"semcomp compress: {out}: {m['rows_in']:,} rows of {', '.join(mods)} -> {m['rows_out']:,} {what}, "
        f"{m['num_shards']} shard(s); manifest {m['status']}",
        shape,
        f"  files: {_size(src)} in -> {_size(dst)} out" + (" (codebook included)" if book else "")
        + (f"; {m['invalid_rows_skipped']:,} rows with NaN/Inf skipped" if m.get("invalid_rows_skipped") else "")
        + (f"; {seconds:.1f} s" if seconds is not None else ""),
    ]
    return "\n".join(lines)


def _pt(v: float) -> str:
    return f"{round(v, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def format_eval(rep: dict) -> str:
    """The eval report as a table: bytes, accuracy / neighbour recall and the change in points."""
    rows = rep["table"]
    lab = rep["labels"]
    k = next((key for key in rows[0] if key.startswith("knn@")), None)
    rk = rep["recall_k"]
    head = ["representation", "bytes/item", "ratio"]
    if lab:
        head += ["probe acc", "Δ pt", f"{k} acc", "Δ pt"]
    head += [f"NN recall@{rk}", "Δ pt"]
    table = []
    for r in rows:
        c = [r["representation"], f"{r['bytes_per_item']:g}", f"{r['compression_ratio']:.2f}x"]
        if lab:
            c += [f"{100 * r['linear_probe']:.1f}%", _pt(r['delta_pt']['linear_probe']),
                  f"{100 * r[k]:.1f}%", _pt(r['delta_pt'][k])]
        c += [f"{100 * r['neighbour_recall']:.1f}%", _pt(r['delta_pt']['neighbour_recall'])]
        table.append(c)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    fmt = lambda cells: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)  # noqa: E731
                                  for i, (x, w) in enumerate(zip(cells, widths)))
    mods = rep["modalities"]
    lines = [f"semcomp eval: {rep['sample']}, {', '.join(mods)} (D {rep['dim']}, {rep['in_dtype']}); "
             + (f"train {rep['train']:,} / test {rep['test']:,}" if lab else "no labels: neighbour recall only"),
             fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in table]
    lines.append(f"ratio: input bytes per item ({len(mods)} x {rep['dim']} {rep['in_dtype']}) / stored bytes. "
                 "Δ pt: percentage points vs the original concat (every embedding kept); negative = lost.")
    lines.append(f"NN recall@{rk}: share of the {rk} nearest rows (cosine) of the original concat that the "
                 f"representation's {rk} nearest recover ({rep['recall_queries']:,} sampled queries among all "
                 f"{rep['rows']:,} rows)" + (f"; probe: {rep['probe']}." if lab else "."))
    base = next(r for r in rows if r["representation"] == "original concat")
    for r in rows:
        if r["representation"].startswith(("compressed", "centroid")):
            what = (f"probe accuracy {100 * base['linear_probe']:.1f}% -> {100 * r['linear_probe']:.1f}% "
                    f"({_pt(r['delta_pt']['linear_probe'])} pt)") if lab else \
                (f"NN recall@{rk} {100 * r['neighbour_recall']:.1f}% ({_pt(r['delta_pt']['neighbour_recall'])} pt)")
            lines.append(f"  {r['representation']}: {r['compression_ratio']:.2f}x fewer bytes, {what}")
    return "\n".join(lines)
