"""semcomp_ext.grad_cache_step: gradient caching with the fused losses.

Every case is fp64 and checks the gradients of every parameter (both towers, the logit scale,
the SigLIP bias) against plain autograd: without dropout against the full-batch
``loss_fn(*[enc(x) ...]).backward()``; with dropout against encoding the same micro-batches,
in the same order, from the same RNG state, with autograd (embeddings and loss bit for bit).
The distributed case runs 2 gloo ranks with DDP-wrapped towers and the distributed fused losses
against the single-process full batch.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semcomp_ext as sc
from semcomp_ext.distributed.launch import launch

TOL = 1e-10
N, D_IN, VOCAB, SEQ, H, D = 14, 12, 40, 6, 24, 16


class ImageTower(nn.Module):
    """open_clip-style: MLP trunk with dropout, projection, L2-normalised output."""

    def __init__(self, p=0.2):
        super().__init__()
        self.fc = nn.Linear(D_IN, H)
        self.drop = nn.Dropout(p)
        self.proj = nn.Linear(H, D, bias=False)

    def forward(self, x):
        return F.normalize(self.proj(self.drop(F.gelu(self.fc(x)))), dim=-1)


class TextTower(nn.Module):
    """Token embedding, dropout, masked mean pooling, projection; takes ids or a dict."""

    def __init__(self, p=0.2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, H)
        self.drop = nn.Dropout(p)
        self.proj = nn.Linear(H, D)

    def forward(self, x):
        ids, mask = (x["input_ids"], x["attention_mask"]) if isinstance(x, dict) else (x, None)
        if isinstance(x, (list, tuple)):
            ids, mask = x
        h = self.drop(self.emb(ids))
        if mask is None:
            pooled = h.mean(1)
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)
        return F.normalize(self.proj(pooled), dim=-1)


def _setup(seed=0, p=0.2, n=N):
    torch.manual_seed(seed)
    towers = [ImageTower(p).double(), TextTower(p).double(), ImageTower(p).double()]
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    mask = (torch.rand(n, SEQ, generator=g) > 0.3).long()
    mask[:, 0] = 1
    audio = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    log_scale = nn.Parameter(torch.tensor(2.3, dtype=torch.float64))
    bias = nn.Parameter(torch.tensor(-3.0, dtype=torch.float64))
    return towers, {"images": images, "ids": ids, "mask": mask, "audio": audio}, log_scale, bias


def _losses(log_scale, bias):
    clip = sc.ClipLoss()
    siglip = sc.SigLipLoss()
    return {
        "ClipLoss": lambda a, b: clip(a, b, log_scale.exp()),
        "SigLipLoss": lambda a, b: siglip(a, b, log_scale.exp(), bias),
        "multimodal": lambda a, b, c: sc.multimodal_infonce_loss([a, b, c], logit_scale=log_scale.exp()),
    }


def _params(towers, log_scale, bias):
    return [p for t in towers for p in t.parameters()] + [log_scale, bias]


def _grads(params):
    out = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _assert_grads_close(got, want, tol=TOL):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"parameter {i}: gradient presence differs"
        if a is not None:
            err = (a - b).abs().max().item()
            assert err <= tol, f"parameter {i}: max |diff| {err:.3g}"


def _case(name, towers, data):
    """encoders, inputs of a loss case (tensor inputs for the towers)."""
    if name == "multimodal":
        return towers, [data["images"], data["ids"], data["audio"]]
    return towers[:2], [data["images"], data["ids"]]


def _full_batch(encoders, inputs, loss_fn, params):
    loss = loss_fn(*[enc(x) for enc, x in zip(encoders, inputs)])
    loss.backward()
    return loss.detach(), _grads(params)


def _micro_batch_autograd(encoders, inputs, loss_fn, params, mb):
    """The reference for dropout: the same micro-batches, same order, with autograd."""
    embs = [torch.cat([enc(x[i:i + mb]) for i in range(0, x.shape[0], mb)]) for enc, x in zip(encoders, inputs)]
    loss = loss_fn(*embs)
    loss.backward()
    return loss.detach(), embs, _grads(params)


@pytest.mark.parametrize("loss_name", ["ClipLoss", "SigLipLoss", "multimodal"])
@pytest.mark.parametrize("micro_batch", [1, 4, N, 100])
def test_matches_full_batch_backward_without_dropout(loss_name, micro_batch):
    towers, data, log_scale, bias = _setup(p=0.0)
    loss_fn = _losses(log_scale, bias)[loss_name]
    encoders, inputs = _case(loss_name, towers, data)
    params = _params(towers, log_scale, bias)
    want_loss, want = _full_batch(encoders, inputs, loss_fn, params)
    got_loss = sc.grad_cache_step(encoders, inputs, loss_fn, micro_batch)
    got = _grads(params)
    assert not got_loss.requires_grad
    assert abs(got_loss.item() - want_loss.item()) <= TOL
    assert got[-2] is not None and got[0] is not None  # the logit scale and the towers got theirs
    if loss_name == "SigLipLoss":
        assert got[-1] is not None and got[-1].abs().item() > 0
    _assert_grads_close(got, want)


@pytest.mark.parametrize("loss_name", ["ClipLoss", "SigLipLoss", "multimodal"])
def test_dropout_replays_the_micro_batches_bit_for_bit(loss_name):
    """micro-batch 4 of 14 rows (ragged last micro-batch), dropout 0.2 in every tower."""
    mb = 4
    towers, data, log_scale, bias = _setup(p=0.2)
    loss_fn = _losses(log_scale, bias)[loss_name]
    encoders, inputs = _case(loss_name, towers, data)
    params = _params(towers, log_scale, bias)

    torch.manual_seed(123)
    want_loss, want_embs, want = _micro_batch_autograd(encoders, inputs, loss_fn, params, mb)
    want_rng = torch.get_rng_state()

    calls = []

    def recording(enc):
        def run(x):
            out = enc(x)
            calls.append((torch.is_grad_enabled(), out.detach().clone()))
            return out
        return run

    torch.manual_seed(123)
    got_loss = sc.grad_cache_step([recording(e) for e in encoders], inputs, loss_fn, mb)
    got = _grads(params)
    assert torch.equal(torch.get_rng_state(), want_rng)  # the caller's RNG moved as one encoding would
    n_calls = len(inputs) * -(-N // mb)
    assert len(calls) == 2 * n_calls
    first, second = calls[:n_calls], calls[n_calls:]
    assert not any(g for g, _ in first) and all(g for g, _ in second)
    flat_want = [e.detach()[i:i + mb] for e in want_embs for i in range(0, N, mb)]
    for (_, a), (_, b), w in zip(first, second, flat_want):
        assert torch.equal(a, w) and torch.equal(b, w)  # same dropout masks in both passes
    assert torch.equal(got_loss, want_loss)
    _assert_grads_close(got, want)
    # dropout is really on: a different seed gives a different loss
    torch.manual_seed(7)
    assert sc.grad_cache_step(encoders, inputs, loss_fn, mb).item() != got_loss.item()


def test_open_clip_model_matches_full_batch():
    """A real open_clip CLIP (tiny config, fp64, eval mode) encoded through encode_image and
    encode_text, with the fused ClipLoss on its logit scale."""
    import open_clip

    from semcomp_ext.open_clip_train import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    model = open_clip.create_model("semcomp-tiny").double().eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, 28, 28, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 1000, (10, 24), generator=g)
    encoders = [lambda x: model.encode_image(x, normalize=True), lambda t: model.encode_text(t, normalize=True)]
    clip = sc.ClipLoss()
    loss_fn = lambda a, b: clip(a, b, model.logit_scale.exp())  # noqa: E731
    params = list(model.parameters())
    want_loss, want = _full_batch(encoders, [images, texts], loss_fn, params)
    got_loss = sc.grad_cache_step(encoders, [images, texts], loss_fn, 3)
    got = _grads(params)
    assert abs(got_loss.item() - want_loss.item()) <= TOL
    i_scale = next(i for i, p in enumerate(params) if p is model.logit_scale)
    assert got[i_scale] is not None and got[i_scale].abs().item() > 0
    _assert_grads_close(got, want)


@pytest.mark.parametrize("kind", ["dict", "list", "tuple"])
def test_dict_and_list_inputs(kind):
    towers, data, log_scale, bias = _setup(p=0.0)
    loss_fn = _losses(log_scale, bias)["ClipLoss"]
    text = {"dict": {"input_ids": data["ids"], "attention_mask": data["mask"]},
            "list": [data["ids"], data["mask"]], "tuple": (data["ids"], data["mask"])}[kind]
    seen = []

    def text_enc(x):
        seen.append(type(x))
        return towers[1](x)

    encoders, inputs = [towers[0], text_enc], [data["images"], text]
    params = _params(towers[:2], log_scale, bias)
    want_loss, want = _full_batch(encoders, inputs, loss_fn, params)
    seen.clear()
    got_loss = sc.grad_cache_step(encoders, inputs, loss_fn, 5)
    got = _grads(params)
    assert set(seen) == {type(text)} and len(seen) == 2 * 3
    assert abs(got_loss.item() - want_loss.item()) <= TOL
    _assert_grads_close(got, want)


def test_keeps_the_callers_autocast_state():
    """bf16 autocast on the CPU: every encoder call (both passes) runs under it, and the
    gradients' error against fp64 is no larger than that of plain full-batch autograd under
    the same autocast (the peer: grad caching sums micro-batch gradients in fp32, where autocast's
    shared bf16 weight copies sum them in bf16)."""
    towers, data, log_scale, bias = _setup(p=0.0)
    params64 = _params(towers[:2], log_scale, bias)[:-1]
    clip = sc.ClipLoss()
    inputs = [data["images"], data["ids"]]
    _, want64 = _full_batch(towers[:2], inputs, lambda a, b: clip(a, b, log_scale.exp()), params64)

    towers = [t.float() for t in towers[:2]]
    log_scale32 = nn.Parameter(torch.tensor(2.3))
    loss_fn = lambda a, b: clip(a, b, log_scale32.exp())  # noqa: E731
    states = []

    def watched(enc):
        def run(x):
            states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            out = enc(x)
            assert out.dtype == torch.bfloat16
            return out
        return run

    encoders = [watched(t) for t in towers]
    inputs = [data["images"].float(), data["ids"]]
    params = [p for t in towers for p in t.parameters()] + [log_scale32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = _full_batch(encoders, inputs, loss_fn, params)
        states.clear()
        sc.grad_cache_step(encoders, inputs, loss_fn, 5)
        assert torch.is_autocast_enabled("cpu")
    got = _grads(params)
    assert states == [(True, torch.bfloat16)] * (2 * 2 * 3)
    for i, (a, b, ref) in enumerate(zip(got, plain, want64)):
        err, err_plain = (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()
        assert err <= 2 * err_plain + 1e-6, f"parameter {i}: {err:.3g} vs plain bf16 {err_plain:.3g}"


class _FakeDDP(nn.Module):
    """A module with DDP's no_sync() context manager; records whether each call ran under it."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log, self.syncing = inner, log, True

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        if torch.is_grad_enabled():
            self.log.append((id(self), self.syncing))
        return self.inner(x)


def test_no_sync_on_all_but_the_last_micro_batch():
    towers, data, log_scale, bias = _setup(p=0.0)
    loss_fn = _losses(log_scale, bias)["ClipLoss"]
    log = []
    a, b = _FakeDDP(towers[0], log), _FakeDDP(towers[1], log)
    factory_log = []

    @contextlib.contextmanager
    def no_sync():
        factory_log.append("enter")
        yield

    sc.grad_cache_step([a, b], [data["images"], data["ids"]], loss_fn, 4, no_sync=no_sync)
    # 4 micro-batches per tower: each module syncs on its own last call only
    assert log == [(id(a), False)] * 3 + [(id(a), True)] + [(id(b), False)] * 3 + [(id(b), True)]
    assert factory_log == ["enter"] * 7  # every call of the pass but the last
    # one module serving both modalities: only the very last call syncs
    log.clear()
    sc.grad_cache_step([a, a], [data["images"], data["images"]], loss_fn, 4)
    assert log == [(id(a), False)] * 7 + [(id(a), True)]


def test_bad_inputs_raise_value_errors_naming_the_argument():
    towers, data, log_scale, bias = _setup(p=0.0)
    loss_fn = _losses(log_scale, bias)["ClipLoss"]
    enc, x = towers[:2], [data["images"], data["ids"]]
    params = _params(towers, log_scale, bias)
    cases = [
        (dict(micro_batch=0), "micro_batch must be an int >= 1, got 0"),
        (dict(micro_batch=-3), "micro_batch must be an int >= 1, got -3"),
        (dict(micro_batch=2.5), "micro_batch must be an int >= 1, got 2.5"),
        (dict(micro_batch=True), "micro_batch must be an int >= 1, got True"),
        (dict(inputs=x[:1]), "inputs has 1 entries but encoders has 2"),
        (dict(inputs=[x[0][:0], x[1][:0]]), r"inputs\[0\] is an empty batch"),
        (dict(inputs=[x[0], {"input_ids": x[1], "attention_mask": data["mask"][:5]}]),
         r"members of inputs\[1\] must have the same number of rows"),
        (dict(inputs=[x[0], [x[1], "mask"]]), r"inputs\[1\]\[1\] must be a tensor"),
        (dict(inputs=[x[0], 3]), r"inputs\[1\] must be a tensor, a dict"),
        (dict(encoders=[towers[0], lambda t: (towers[1](t),)]), r"encoders\[1\] must return a tensor"),
        (dict(encoders=[towers[0], lambda t: towers[1](t)[:1]]), r"encoders\[1\] returned shape \(1, 16\)"),
        (dict(encoders=[towers[0], "text"]), r"encoders\[1\] must be callable"),
        (dict(inputs=[x[0], x[1][:9]]), r"loss_fn rejected the embeddings of inputs with \[14, 9\] rows"),
        (dict(loss_fn=lambda a, b: (a * b).sum(1)), "loss_fn must return a scalar"),
        (dict(loss_fn=None), "loss_fn must be callable"),
        (dict(no_sync=3), "no_sync must be a context-manager factory"),
    ]
    for change, match in cases:
        kw = dict(encoders=enc, inputs=x, loss_fn=loss_fn, micro_batch=4)
        kw.update(change)
        no_sync = kw.pop("no_sync", None)
        with pytest.raises(ValueError, match=match):
            sc.grad_cache_step(kw["encoders"], kw["inputs"], kw["loss_fn"], kw["micro_batch"], no_sync=no_sync)
        assert all(p.grad is None for p in params), f"{change}: gradients were touched"


# ---- 2 gloo ranks --------------------------------------------------------------------------


def _distributed_worker(rank, world):
    """Each rank holds n rows of the global batch and DDP-wrapped towers; grad_cache_step with
    the distributed fused losses must give the single-process full-batch loss and gradients
    (DDP averages the towers' gradients; the loss parameters are averaged here)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for loss_name in ("ClipLoss", "SigLipLoss", "multimodal"):
        towers, data, log_scale, bias = _setup(seed=3, p=0.0, n=2 * 6)
        ref_loss_fn = _losses(log_scale, bias)[loss_name]
        encoders, inputs = _case(loss_name, towers, data)
        params = _params(towers, log_scale, bias)
        want_loss, want = _full_batch(encoders, inputs, ref_loss_fn, params)

        clip = sc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        siglip = sc.SigLipLoss(rank=rank, world_size=world)
        dist_loss = {
            "ClipLoss": lambda a, b: clip(a, b, log_scale.exp()),
            "SigLipLoss": lambda a, b: siglip(a, b, log_scale.exp(), bias),
            "multimodal": lambda a, b, c: sc.multimodal_infonce_loss(
                [a, b, c], logit_scale=log_scale.exp(), distributed=True, local_loss=True,
                gather_with_grad=True, impl="ring"),
        }[loss_name]
        ddp = [DDP(t) for t in encoders]
        local = [x[rank * 6:(rank + 1) * 6] for x in inputs]
        loss = sc.grad_cache_step(ddp, local, dist_loss, 4)
        for p in (log_scale, bias):
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        dist.all_reduce(loss)
        got = _grads(params)
        err = max(((a - b).abs().max().item() for a, b in zip(got, want) if a is not None), default=float("inf"))
        results[loss_name] = {
            "loss_err": abs(loss.item() / world - want_loss.item()),
            "grad_err": err,
            "same_presence": [a is None for a in got] == [b is None for b in want],
        }
    return results


def test_two_gloo_ranks_with_distributed_fused_losses_match_single_process():
    per_rank = launch(_distributed_worker, 2, timeout=120, pg_timeout=30)
    for rank, res in enumerate(per_rank):
        assert set(res) == {"ClipLoss", "SigLipLoss", "multimodal"}
        for name, r in res.items():
            assert r["same_presence"], f"rank {rank} {name}"
            assert r["loss_err"] <= TOL, f"rank {rank} {name} loss {r['loss_err']:.3g}"
            assert r["grad_err"] <= TOL, f"rank {rank} {name} gradients {r['grad_err']:.3g}"
