"""Benchmarks of semcomp's ops against their peers and the machine's measured ceilings: the
one implementation behind `semcomp bench` and the scripts in benchmarks/.

Modules: timing (timers, peak memory, ceilings, environment), infonce, segment_gather, siglip,
grad_cache, compress (`semcomp compress` throughput, CPU time and RSS), compress_s3 (the CLI
against a local S3 endpoint), index (`semcomp index` / `search` build time and recall),
gpu_timing (the GPU window's per-implementation timing), impl_table (the table behind
impl="auto" from timing results), run (one
whole run), results (ratios, tables, markdown, plot; no torch), report (markdown from the result
files of benchmarks/), cli (the subcommand). Importing this package imports no torch.
"""
