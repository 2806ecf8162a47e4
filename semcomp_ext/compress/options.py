"""The options of a compression job, validated once, with messages that name the field.

`CompressOptions.validated()` checks every field that can be checked without opening an input
(torch-free: the CLI calls it before the heavy imports); `compress()` calls it again, so the
Python API gets the same checks. An `OptionError` names its field (`drop_rate must be in
[0, 1), got 1.5`); the command line shows it under the flag's name (`flag_message`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .shard import DEFAULT_BATCH_ROWS

NORMALIZE = ("none", "input", "output", "both")
OUT_DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")


def _worded(name: str, other: str | None, message: str) -> str:
    """`name message` (`drop_rate must be ...`), or `name: ...` for a message that starts with
    a colon (`resume: parameters differ ...`); `name or other: message` for a conflict."""
    if other:
        return f"{name} or {other}: {message.lstrip(': ')}"
    return f"{name}{message}" if message.startswith(":") else f"{name} {message}"


class _Named:
    """What the option errors share: `field` is the option's name in the Python API, `other`
    the field it conflicts with; the message reads after the name."""

    def _name(self, field: str, message: str, other: str | None) -> str:
        self.field, self.message, self.other = field, message, other
        return _worded(field, other, message)


class OptionError(_Named, ValueError):
    """A bad option value (`codec or out_dtype: give one, not both`)."""

    def __init__(self, field: str, message: str, other: str | None = None):
        super().__init__(self._name(field, message, other))


class OptionPathError(_Named, FileNotFoundError):
    """A path an option names that does not exist (`modalities: img: no such file or folder`)."""

    def __init__(self, field: str, message: str, other: str | None = None):
        super().__init__(self._name(field, message, other))


class OptionStateError(_Named, FileExistsError):
    """An option the output folder's state refuses (`resume: OUT has no manifest.json`)."""

    def __init__(self, field: str, message: str, other: str | None = None):
        super().__init__(self._name(field, message, other))


# fields whose flag is not --field-with-dashes
_FLAGS = {"out": "-o/--out", "inputs": "the inputs", "modalities": "--modality", "seed": "--seed",
          "sample_seed": "--sample-seed", "k": "--k"}


def flag_name(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def flag_message(exc: _Named) -> str:
    """The message of an option error as the command line words it (the flag for the field)."""
    return _worded(flag_name(exc.field), flag_name(exc.other) if exc.other else None, exc.message)


def check_int(field: str, value, lo: int | None = None, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(field, f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise OptionError(field, f"must be >= {lo}, got {value}")


def check_choice(field: str, value, choices, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if value not in choices:
        raise OptionError(field, f"must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def check_rfs(drop_rate, keep, dim: int | None = None) -> None:
    """drop_rate in [0, 1) or keep in [1, dim], not both."""
    if drop_rate is not None and keep is not None:
        raise OptionError("drop_rate", "give one, not both", other="keep")
    if drop_rate is not None:
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise OptionError("drop_rate", f"must be in [0, 1), got {drop_rate!r}")
    if keep is not None:
        check_int("keep", keep, 1)
        if dim is not None and keep > dim:
            raise OptionError("keep", f"must be at most the input dimension {dim}, got {keep}")


def check_storage(codec, out_dtype) -> None:
    check_choice("out_dtype", out_dtype, OUT_DTYPES, none_ok=True)
    if codec is not None and out_dtype is not None and codec != out_dtype:
        raise OptionError("codec", f"give one, not both (got {codec!r} and {out_dtype!r})", other="out_dtype")
    if codec is not None:
        from .codecs import parse_codec

        parse_codec(codec)  # an OptionError naming the field codec


@dataclass
class CompressOptions:
    inputs: list
    out: str
    metadata: str | None = None
    concepts: str | None = None
    concept_column: str = "concept"
    embedding_column: str = "embedding"
    drop_rate: float | None = None
    keep: int | None = None
    seed: int = 0
    normalize: str = "none"
    out_dtype: str | None = None  # float32 | float16; None: the input dtype (float64 input -> float32)
    codec: str | None = None  # storage codec (codecs.parse_codec); None = out_dtype
    codec_sample_rows: int = 65536
    batch_size: int = DEFAULT_BATCH_ROWS
    partitions: int = 0
    skip_invalid: bool = False
    engine: str = "local"
    ray_address: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    workers: int | None = None    # shards in parallel (local: threads, None = the usable cores; ray: tasks)
    modalities: list | None = None  # ["NAME=PATH", ...] instead of `inputs` (a file or folder each)
    storage_options: dict | None = None  # fsspec options for URL inputs/outputs (never written or logged)
    device: str = "cpu"  # cpu | cuda | cuda:N: where the centroid + RFS runs (same bytes; not in the manifest)

    def validated(self) -> CompressOptions:
        """Every check that needs no input file; OptionError naming the field otherwise."""
        if not self.inputs and not self.modalities:
            raise OptionError("inputs", "missing: give the embedding files or folders (or modalities)")
        if self.inputs and self.modalities:
            raise OptionError("inputs", "give the inputs as paths or as NAME=PATH modalities, not both", other="modalities")
        for spec in self.modalities or []:
            name, sep, path = spec.partition("=") if isinstance(spec, str) else \
                (spec[0], "=", spec[1]) if isinstance(spec, (tuple, list)) and len(spec) == 2 else ("", "", "")
            if not sep or not name or not path:
                raise OptionError("modalities", f"must be NAME=PATH, got {spec!r}")
        if not isinstance(self.out, str) or not self.out:
            raise OptionError("out", f"must be a folder path or URL, got {self.out!r}")
        if self.resume and self.overwrite:
            raise OptionError("resume", "give one, not both", other="overwrite")
        check_rfs(self.drop_rate, self.keep)
        check_int("seed", self.seed)
        check_choice("normalize", self.normalize, NORMALIZE)
        check_storage(self.codec, self.out_dtype)
        check_int("codec_sample_rows", self.codec_sample_rows, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("partitions", self.partitions, 0)
        check_choice("engine", self.engine, ENGINES)
        check_int("workers", self.workers, 1, none_ok=True)
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise OptionError("storage_options", "must be a dict (a JSON object on the command line)")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise OptionError("device", f"must be cpu, cuda or cuda:N, got {self.device!r}")
        return self
