"""Storage codecs: the form in which compressed vectors (centroid + RFS, K columns) are stored.

    parse_codec("int8")            -> Codec          a spec from `semcomp compress --codec`
    codec.fit(sample)                                 only when codec.needs_fit
    fit_codec(codec, sample, quiet=False) -> seconds  the same, with progress lines and timing
    codes = codec.encode(x)        x: float32 (n, K)
    x_hat = codec.decode(codes)    float32 (n, K)
    codec.to_manifest()            -> dict, JSON-ready: everything needed to decode
    codec_from_manifest(manifest)  -> Codec           (a manifest without "codec": float16/32)

Specs and their codes (what a shard file `centroids_*.npy` holds):

| spec              | fit | codes                                  | bytes/vector      |
|-------------------|-----|----------------------------------------|-------------------|
| `float32`         | no  | float32 (n, K)                         | 4 K               |
| `float16`         | no  | float16 (n, K)                         | 2 K               |
| `int8`            | yes | int8 (n, K); x ≈ code * scale[k]       | K                 |
| `binary`          | no  | uint8 (n, ceil(K/8)), np.packbits(x>0) | ceil(K/8)         |
| `pq:M`            | yes | uint8 (n, M), 8-bit sub-quantiser ids  | M                 |
| `faiss:<factory>` | yes | uint8 (n, sa_code_size) (faiss sa_encode) | sa_code_size   |

* int8: symmetric per-dimension scale = max |x[:, k]| / 127 over the fit sample; values beyond
  the sample's range are clipped to ±127. Within range the error is at most scale[k] / 2.
* binary: bit k = (x[k] > 0). decode gives ±1/sqrt(K) (unit-norm vectors), so the inner
  product of two decoded vectors is 1 - 2 * hamming / K: ranking by inner product (or cosine)
  of decoded vectors is ranking by Hamming distance of the sign bits, and a float query's
  inner product with a decoded vector ranks like the query's inner product with the signs.
* pq:M: faiss.ProductQuantizer(K, M, 8) (M must divide K), k-means seeded by the compress seed.
  The codebooks (float32, (M, 256, K/M)) are stored base64 in the manifest entry, so a manifest
  alone decodes its shards; decoding is plain numpy and does not need faiss.
* faiss:<factory>: any faiss.index_factory string with a standalone codec (sa_encode /
  sa_decode), e.g. `faiss:OPQ16,PQ16` or `faiss:SQ4`; the trained index is serialised
  (faiss.serialize_index) base64 into the manifest; faiss is needed to encode and decode.
  Training is deterministic through faiss's fixed default k-means seeds. A PQ's polysemous
  training (a reordering of centroid ids for Hamming-filtered search) is turned off: the codec
  never searches, and it cost ~4x the k-means.

Fitting pq:M and faiss codecs is one blocking faiss call (k-means; OPQ's alternating
optimisation takes minutes for 65 536 rows on 2 cores): `fit_codec` prints a start line, a line
every 10 s while it runs (a heartbeat thread; terminals and pipes alike) and the fit's own wall
time at the end, with faiss's OpenMP threads set to the usable cores (`heartbeat.faiss_threads`).

Binary payloads in a manifest entry carry their sha256, checked on load. They are stored in the
manifest rather than a sidecar file because the manifest is written (atomically) before the
first shard, so a resumed run reads back exactly the fitted parameters: its output stays
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import abc
import base64
import hashlib

import numpy as np

from .heartbeat import HEARTBEAT_SECONDS, Heartbeat, faiss_threads
from .options import OptionError

__all__ = ["Codec", "FloatCodec", "Int8Codec", "BinaryCodec", "PQCodec", "FaissCodec",
           "parse_codec", "codec_from_manifest", "fit_codec", "SPECS"]

SPECS = "float32, float16, int8, binary, pq:M or faiss:<index_factory string>"
_PQ_BITS = 8
_PQ_KSUB = 1 << _PQ_BITS


def _as_f32(x, what: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (n, K) array, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _b64(a: bytes) -> dict:
    return {"base64": base64.b64encode(a).decode("ascii"), "sha256": hashlib.sha256(a).hexdigest()}


def _unb64(d: dict, what: str) -> bytes:
    a = base64.b64decode(d["base64"])
    if hashlib.sha256(a).hexdigest() != d["sha256"]:
        raise ValueError(f"codec manifest: {what} payload does not match its sha256 (corrupt manifest)")
    return a


def _faiss(spec: str):
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(f"codec {spec!r} needs faiss: pip install faiss-cpu") from exc
    return faiss


class Codec(abc.ABC):
    """Base class. `name` is the spec string that parse_codec accepts; every codec implements
    encode, decode and code_width."""

    name: str = ""
    needs_fit: bool = False
    code_dtype: str = "float32"

    def __init__(self):
        self.dim: int | None = None  # K, known once fitted (or from the first encode)

    def fit(self, sample: np.ndarray) -> None:
        self.dim = _as_f32(sample, "fit sample").shape[1]

    @abc.abstractmethod
    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 (n, K) -> codes (n, code_width(K))."""

    @abc.abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes -> float32 (n, K)."""

    @abc.abstractmethod
    def code_width(self, K: int) -> int:
        """Columns of the code array of one vector of K values."""

    def _params(self) -> dict:
        """The fitted parameters, JSON-ready (inverse: _load)."""
        return {}

    def _load(self, d: dict) -> None:
        self.dim = d.get("dim")

    # -- shared --------------------------------------------------------------------------
    def bytes_per_vector(self, K: int) -> float:
        return float(self.code_width(K) * np.dtype(self.code_dtype).itemsize)

    def code_shape(self, n: int, K: int) -> tuple:
        return (n, self.code_width(K))

    def to_manifest(self) -> dict:
        self._check_fitted()
        d = {"name": self.name, "code_dtype": self.code_dtype}
        if self.dim is not None:
            d["dim"] = self.dim
        return d | self._params()

    @property
    def fitted(self) -> bool:
        return True

    def _check_fitted(self):
        if not self.fitted:
            raise ValueError(f"codec {self.name!r} is not fitted: call fit(sample) first")

    def _check_dim(self, K: int, what: str):
        if self.dim is not None and K != self.dim:
            raise ValueError(f"codec {self.name!r}: {what} has {K} columns, the codec is for K={self.dim}")

    def _check_codes(self, codes) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype != np.dtype(self.code_dtype):
            raise ValueError(f"codec {self.name!r}: codes must be 2-D {self.code_dtype}, "
                             f"got shape {codes.shape} dtype {codes.dtype}")
        if self.dim is not None and codes.shape[1] != self.code_width(self.dim):
            raise ValueError(f"codec {self.name!r}: codes have {codes.shape[1]} columns, "
                             f"expected {self.code_width(self.dim)} for K={self.dim}")
        return codes

    def __repr__(self):
        return f"<Codec {self.name}>"


class FloatCodec(Codec):
    """float32 / float16 storage: the pre-codec behaviour (`--out-dtype`)."""

    def __init__(self, dtype: str):
        super().__init__()
        if dtype not in ("float32", "float16"):
            raise ValueError(f"float codec dtype must be float32 or float16, got {dtype!r}")
        self.name = self.code_dtype = dtype

    def encode(self, x):
        x = _as_f32(x)
        self._check_dim(x.shape[1], "x")
        return x if self.code_dtype == "float32" else x.astype(np.float16)

    def decode(self, codes):
        return self._check_codes(codes).astype(np.float32)

    def code_width(self, K):
        return K


class Int8Codec(Codec):
    name, needs_fit, code_dtype = "int8", True, "int8"

    def __init__(self):
        super().__init__()
        self.scale = None  # float32 (K,)

    @property
    def fitted(self):
        return self.scale is not None

    def fit(self, sample):
        sample = _as_f32(sample, "fit sample")
        if sample.shape[0] == 0:
            raise ValueError("codec 'int8': the fit sample is empty")
        amax = np.abs(sample).max(0)
        # an all-zero column gets scale 1 (codes 0, decoded exactly)
        self.scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        self.dim = sample.shape[1]

    def encode(self, x):
        self._check_fitted()
        x = _as_f32(x)
        self._check_dim(x.shape[1], "x")
        return np.clip(np.rint(x / self.scale), -127, 127).astype(np.int8)

    def decode(self, codes):
        self._check_fitted()
        return self._check_codes(codes).astype(np.float32) * self.scale

    def code_width(self, K):
        return K

    def _params(self):
        return {"scale": [float(s) for s in self.scale]}

    def _load(self, d):
        self.scale = np.asarray(d["scale"], dtype=np.float32)
        self.dim = self.scale.shape[0]


class BinaryCodec(Codec):
    name, needs_fit, code_dtype = "binary", False, "uint8"

    def encode(self, x):
        x = _as_f32(x)
        self._check_dim(x.shape[1], "x")
        if self.dim is None:
            self.dim = x.shape[1]
        return np.packbits(x > 0, axis=1)

    def decode(self, codes):
        if self.dim is None:
            raise ValueError("codec 'binary': K (dim) is unknown; encode first or load it from a manifest")
        bits = np.unpackbits(self._check_codes(codes), axis=1, count=self.dim)
        return (bits.astype(np.float32) * 2 - 1) * np.float32(1 / np.sqrt(self.dim))

    def code_width(self, K):
        return (K + 7) // 8


class PQCodec(Codec):
    needs_fit, code_dtype = True, "uint8"

    def __init__(self, m: int, seed: int = 0):
        super().__init__()
        if m < 1:
            raise ValueError(f"pq:M needs M >= 1, got M={m}")
        self.m, self.seed, self.name = m, seed, f"pq:{m}"
        self.codebooks = None  # float32 (M, 256, K/M)
        self._pq = None

    @property
    def fitted(self):
        return self.codebooks is not None

    def _new_pq(self, K: int):
        faiss = _faiss(self.name)
        if K % self.m:
            raise ValueError(f"codec {self.name!r}: M={self.m} must divide the vector length K={K}")
        return faiss.ProductQuantizer(K, self.m, _PQ_BITS)

    def fit(self, sample):
        sample = _as_f32(sample, "fit sample")
        pq = self._new_pq(sample.shape[1])
        if sample.shape[0] < _PQ_KSUB:
            raise ValueError(f"codec {self.name!r}: the fit sample has {sample.shape[0]} rows, "
                             f"needs at least {_PQ_KSUB} (one per centroid)")
        pq.cp.seed = self.seed
        pq.cp.min_points_per_centroid = 1  # small samples are fine; silence faiss's warning
        pq.train(sample)
        import faiss

        self.dim = sample.shape[1]
        self.codebooks = faiss.vector_to_array(pq.centroids).reshape(self.m, _PQ_KSUB, self.dim // self.m)
        self._pq = pq

    def _quantizer(self):
        if self._pq is None:
            import faiss

            pq = self._new_pq(self.dim)
            faiss.copy_array_to_vector(self.codebooks.ravel(), pq.centroids)
            self._pq = pq
        return self._pq

    def encode(self, x):
        self._check_fitted()
        x = _as_f32(x)
        self._check_dim(x.shape[1], "x")
        return self._quantizer().compute_codes(x)

    def decode(self, codes):
        self._check_fitted()
        codes = self._check_codes(codes)
        n = codes.shape[0]
        # codebooks[m, codes[:, m]] for every m, laid side by side: (n, M, K/M) -> (n, K)
        return self.codebooks[np.arange(self.m), codes].reshape(n, self.dim)

    def code_width(self, K):
        return self.m

    def _params(self):
        return {"m": self.m, "nbits": _PQ_BITS, "seed": self.seed,
                "codebooks": _b64(self.codebooks.tobytes()) | {"shape": list(self.codebooks.shape)}}

    def _load(self, d):
        cb = d["codebooks"]
        self.codebooks = np.frombuffer(_unb64(cb, "pq codebooks"), dtype=np.float32).reshape(cb["shape"]).copy()
        self.dim = self.m * self.codebooks.shape[2]

    def __getstate__(self):  # pickles to Ray workers without the faiss object
        return self.__dict__ | {"_pq": None}


def _no_polysemous_training(faiss, index) -> None:
    """Turn off the polysemous training of a PQ inside `index` (IndexPQ and IndexIVFPQ do it
    by default): it only reorders the centroid ids for Hamming-filtered search, which
    sa_encode / sa_decode never use, and it took ~4x the PQ's own k-means (PQ16 on 16k x 256:
    34 s of CPU instead of 8 s). The reconstructions are the same up to that reordering."""
    while index is not None:
        index = faiss.downcast_index(index)
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = False
        index = getattr(index, "index", None) if isinstance(index, faiss.IndexPreTransform) else None


class FaissCodec(Codec):
    needs_fit, code_dtype = True, "uint8"

    def __init__(self, factory: str):
        super().__init__()
        self.factory, self.name = factory, f"faiss:{factory}"
        self.index = None

    @property
    def fitted(self):
        return self.index is not None

    def fit(self, sample):
        sample = _as_f32(sample, "fit sample")
        faiss = _faiss(self.name)
        try:
            index = faiss.index_factory(sample.shape[1], self.factory)
        except RuntimeError as exc:
            raise ValueError(f"codec {self.name!r}: faiss.index_factory rejects {self.factory!r} "
                             f"for K={sample.shape[1]}: {str(exc).strip().splitlines()[-1]}") from exc
        if not index.is_trained:
            _no_polysemous_training(faiss, index)
            index.train(sample)
        try:
            index.sa_code_size()
        except RuntimeError as exc:
            raise ValueError(f"codec {self.name!r}: this faiss index has no standalone codec (sa_encode)") from exc
        self.index, self.dim = index, sample.shape[1]

    def encode(self, x):
        self._check_fitted()
        x = _as_f32(x)
        self._check_dim(x.shape[1], "x")
        return self.index.sa_encode(x)

    def decode(self, codes):
        self._check_fitted()
        return self.index.sa_decode(np.ascontiguousarray(self._check_codes(codes)))

    def code_width(self, K):
        self._check_fitted()
        return self.index.sa_code_size()

    def _params(self):
        faiss = _faiss(self.name)
        return {"factory": self.factory,
                "index": _b64(faiss.serialize_index(self.index).tobytes())}

    def _load(self, d):
        faiss = _faiss(self.name)
        self.index = faiss.deserialize_index(np.frombuffer(_unb64(d["index"], "faiss index"), dtype=np.uint8))
        self.dim = self.index.d

    def __getstate__(self):
        faiss = _faiss(self.name)
        d = dict(self.__dict__)
        d["index"] = None if self.index is None else faiss.serialize_index(self.index)
        return d

    def __setstate__(self, d):
        if d["index"] is not None:
            d["index"] = _faiss(d["name"]).deserialize_index(d["index"])
        self.__dict__.update(d)


def parse_codec(spec: str, seed: int = 0) -> Codec:
    """The codec named by `spec` (see the module docstring). `seed` seeds pq:M k-means."""
    if not isinstance(spec, str):
        raise OptionError("codec", f"must be a string ({SPECS}), got {spec!r}")
    s = spec.strip()
    if s in ("float32", "float16"):
        return FloatCodec(s)
    if s == "int8":
        return Int8Codec()
    if s == "binary":
        return BinaryCodec()
    if s.startswith("pq:"):
        m = s[3:]
        if not m.isdigit() or int(m) < 1:
            raise OptionError("codec", f"{spec!r}: pq:M needs a positive integer M (sub-quantisers), got {m!r}")
        return PQCodec(int(m), seed=seed)
    if s.startswith("faiss:"):
        if not s[6:].strip():
            raise OptionError("codec", f"{spec!r}: faiss:<factory> needs an index_factory string, e.g. faiss:OPQ16,PQ16")
        return FaissCodec(s[6:].strip())
    raise OptionError("codec", f"{spec!r} is not a codec; expected one of {SPECS}")


def fit_codec(codec: Codec, sample, *, quiet: bool = True, stream=None, every: float = HEARTBEAT_SECONDS,
              threads: int | None = None) -> float:
    """codec.fit(sample) with progress: a start line, a heartbeat every `every` seconds while
    the (blocking) fit runs, and the fit's wall time at the end, on `stream` (stderr) unless
    quiet. faiss codecs run on `threads` OpenMP threads (default: the usable cores). Returns
    the fit's wall time in seconds."""
    shape = np.shape(sample)
    rows = f"{shape[0]:,} x {shape[1]}" if len(shape) == 2 else f"shape {shape}"
    with Heartbeat(f"codec {codec.name}: fitting on {rows}", quiet=quiet, every=every, stream=stream) as hb:
        if isinstance(codec, (PQCodec, FaissCodec)):
            with faiss_threads(threads):
                codec.fit(sample)
        else:
            codec.fit(sample)
    return hb.seconds


def codec_from_manifest(d: dict, folder: str | None = None) -> Codec:
    """Codec of a compressed folder. `d` is a whole manifest (its "codec" entry, or, in a
    manifest written before codecs existed, float storage of parameters.out_dtype) or a codec
    entry (`Codec.to_manifest()`). `folder` is accepted for readers that pass it; every
    parameter lives in the manifest itself."""
    del folder
    if "codec" in d and isinstance(d["codec"], dict):
        d = d["codec"]
    elif "parameters" in d or "format" in d:
        return FloatCodec(d.get("parameters", {}).get("out_dtype", "float32"))
    name = d.get("name")
    if name is None:
        raise ValueError(f"codec manifest entry has no 'name': {sorted(d)}")
    codec = parse_codec(name, seed=d.get("seed", 0))
    codec._load(d)
    dim = d.get("dim")
    if dim is not None and codec.dim != dim:
        raise ValueError(f"codec manifest entry {name!r}: parameters give K={codec.dim}, entry says dim={dim}")
    return codec
