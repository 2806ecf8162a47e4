"""Row chunking of the CUDA InfoNCE paths (csrc/infonce/infonce_chunks.h): the arithmetic is
compiled here with the host C++ compiler and checked on any machine; on a GPU, the gemm
path's forward and backward split the rows at the same boundaries."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "infonce/infonce_chunks.h"
using namespace semcomp::chunks;
// one query per line on stdin, one answer per line on stdout
int main() {
  char op[16];
  while (std::scanf("%15s", op) == 1) {
    long long a, b, c, d, e;
    if (!std::strcmp(op, "gemm")) {  // requested rows cols acc_bytes in_bytes(0: not mixed)
      std::scanf("%lld %lld %lld %lld %lld", &a, &b, &c, &d, &e);
      std::printf("%lld\n", (long long)chunk_rows(a, b, c, gemm_bytes_per_logit(d, e, e > 0)));
    } else if (!std::strcmp(op, "rows")) {  // requested rows cols bytes_per_elem
      std::scanf("%lld %lld %lld %lld", &a, &b, &c, &d);
      std::printf("%lld\n", (long long)chunk_rows(a, b, c, d));
    } else if (!std::strcmp(op, "tile")) {  // nq nk sym sms -> chunk rows, extra bytes
      std::scanf("%lld %lld %lld %lld", &a, &b, &c, &d);
      std::printf("%lld %lld\n", (long long)tile_fwd_chunk_rows(a, b, c != 0),
                  (long long)tile_fwd_extra_bytes(a, b, c != 0, d));
    } else {
      return 2;
    }
  }
  std::printf("budgets %lld %lld\n", (long long)kGemmBudgetBytes, (long long)kTileColBudgetBytes);
  return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "a host C++ compiler is needed to check csrc/infonce/infonce_chunks.h"
    d = tmp_path_factory.mktemp("chunks")
    (d / "probe.cpp").write_text(PROBE)
    exe = d / "probe"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(d / "probe.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def ask(*queries):
        text = "\n".join(" ".join(str(x) for x in q) for q in queries) + "\n"
        out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True).stdout.split("\n")
        assert out[len(queries)].startswith("budgets ")
        return [tuple(int(v) for v in line.split()) for line in out[: len(queries)]]

    return ask


SIZES = [1, 5, 63, 64, 65, 4096, 32768, 65535, 65536, 100003, 131072, 262143, 262144]


def test_tile_forward_extra_memory_stays_under_256_mib_up_to_262144(probe):
    queries = [("tile", n, n, sym, sms) for n in SIZES for sym in (1, 0) for sms in (108, 132, 144)]
    for q, (rows, extra) in zip(queries, probe(*queries)):
        n, sym = q[1], q[3]
        assert extra <= 256 * MIB, f"N = {n}, sym = {sym}, sms = {q[4]}: {extra / MIB:.1f} MiB"
        assert 1 <= rows <= n and (rows == n or rows % 64 == 0), (q, rows)
    # what the old single pass kept: 8 bytes x N per block of 64 rows (8 GiB at 262144)
    (rows, extra), = probe(("tile", 262144, 262144, 1, 132))
    assert rows < 262144 and extra < 8 * 262144 * (262144 // 64) / 16
    # up to N = 32768 the partials of all rows fit one pass (no extra launches)
    (rows, extra), = probe(("tile", 32768, 32768, 1, 132))
    assert rows == 32768 and extra <= 130 * MIB


def test_tile_forward_rectangular_form_is_one_pass(probe):
    # no column partials: only the row partials (splits x nq) and the positive logits
    (rows, extra), = probe(("tile", 262144, 300000, 0, 132))
    assert rows == 262144 and extra < 16 * MIB


def test_gemm_chunk_budget_and_bounds(probe):
    queries, expect = [], []
    for n in (1, 100, 4096, 32768, 65536, 262144):
        for acc, inb in ((4, 2), (4, 0), (8, 0)):
            queries.append(("gemm", 0, n, n, acc, inb))
            expect.append((n, acc + inb))
    for (n, bpe), (c,) in zip(expect, probe(*queries)):
        assert 1 <= c <= min(n, 8192)
        assert c == n or c % 64 == 0
        if c > 64:  # above the floor the blocks fit the 128 MiB budget
            assert c * n * bpe <= 128 * MIB, (n, bpe, c)
    # bf16 at N = 32768: W (4 bytes) + G (2 bytes) per logit -> 640 rows in both passes
    assert probe(("gemm", 0, 32768, 32768, 4, 2)) == [(640,)]
    # an explicit chunk_size wins, capped at the rows
    assert probe(("gemm", 100, 5000, 5000, 4, 2), ("gemm", 9999, 5000, 5000, 4, 2)) == [(100,), (5000,)]


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the chunk agreement on cuBLAS needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_backward_splits_rows_where_forward_does(dtype, probe):
    """Automatic chunking gives the same bits as an explicit chunk_size equal to the forward's
    split, in the forward and the backward (whose dk accumulates chunk by chunk, so a different
    split changes its bits): the backward sees the forward's W blocks."""
    import torch.nn.functional as F

    import semcomp_ext as sc
    from semcomp_ext._ops import ops

    n, d = 8192, 64  # several chunks: 2688 rows (bf16/fp16), 4096 (fp32)
    mixed = dtype != torch.float32
    (c,), = probe(("gemm", 0, n, n, 4, 2 if mixed else 0))
    assert c < n
    previous = sc.set_infonce_cuda_impl("gemm")
    try:
        a = F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype)
        b = F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype)
        s = torch.tensor(30.0, device="cuda")
        outs = []
        for chunk in (0, c):
            loss, r, col = ops.infonce_fwd(a, b, s, chunk)
            coef = torch.full_like(r, 0.5 / n)
            outs.append((loss, r, col) + tuple(ops.infonce_bwd(a, b, s, r, col, coef, coef, coef * 2, chunk)))
        for name, x, y in zip(("loss", "rlse", "clse", "da", "db", "ds"), *outs):
            assert torch.equal(x, y), f"{name}: automatic chunks differ from chunk_size={c}"
    finally:
        sc.set_infonce_cuda_impl(previous)
