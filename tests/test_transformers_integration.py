"""semcomp_ext.integrations.transformers against transformers' own CLIP and SigLIP losses.

Tiny randomly initialised CLIPModel / SiglipModel (16x16 images, 8x8 patches, 1-layer towers):
the patched ``return_loss=True`` forward and the plain ``clip_loss`` / ``siglip_loss`` functions
give the loss and every parameter gradient of the unpatched model (fp32, 1e-5), with the same
logits; patch/unpatch are idempotent.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel  # noqa: E402

from semcomp_ext.integrations import transformers as sc_hf  # noqa: E402

TOL = 1e-5
N = 6
TEXT = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_channels=3)


def build(kind: str):
    torch.manual_seed(0)
    if kind == "clip":
        cfg = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
        model = CLIPModel(cfg)
    else:
        cfg = SiglipConfig(text_config=TEXT, vision_config=VISION)
        model = SiglipModel(cfg)
        with torch.no_grad():  # away from their init so that the scale and bias gradients matter
            model.logit_scale.fill_(1.3)
            model.logit_bias.fill_(-2.0)
    return model.train()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (N, 7), generator=g)
    pixels = torch.randn(N, 3, 16, 16, generator=g)
    return dict(input_ids=ids, pixel_values=pixels)


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def run(model, loss_of, seed=1, **kw):
    """The loss, gradients and logits of one forward/backward from the RNG state `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs(), **kw)
    loss = loss_of(out)
    loss.backward()
    return loss.detach(), grads(model), out


def assert_same(a, b):
    (la, ga, oa), (lb, gb, ob) = a, b
    assert ga.keys() == gb.keys() and {"logit_scale"} <= ga.keys()
    assert float((la - lb).abs()) <= TOL, (la, lb)
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=TOL, rtol=0), (k, float((ga[k] - gb[k]).abs().max()))
    for key in ("logits_per_text", "logits_per_image", "text_embeds", "image_embeds"):
        assert torch.equal(oa[key], ob[key]), key


@pytest.fixture(autouse=True)
def _unpatched():
    sc_hf.unpatch()
    yield
    sc_hf.unpatch()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_patched_return_loss_matches_upstream(kind):
    model = build(kind)
    ref = run(model, lambda o: o.loss, return_loss=True)
    sc_hf.patch()
    ours = run(model, lambda o: o.loss, return_loss=True)
    assert_same(ours, ref)
    if kind == "siglip":
        assert "logit_bias" in ours[1]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_functions_match_upstream(kind):
    model = build(kind)
    ref = run(model, lambda o: o.loss, return_loss=True)
    fn = sc_hf.clip_loss if kind == "clip" else sc_hf.siglip_loss
    assert_same(run(model, lambda o: fn(o, model)), ref)
    if kind == "clip":
        assert_same(run(model, lambda o: fn((o.text_embeds, o.image_embeds), model.logit_scale)), ref)
    else:
        assert_same(run(model, lambda o: fn((o.text_embeds, o.image_embeds), model.logit_scale, model.logit_bias)), ref)


def test_patched_forward_really_uses_the_fused_kernels(monkeypatch):
    """With the patch, transformers' CLIP loss function is never called and the fused op is."""
    import transformers.models.clip.modeling_clip as mc

    from semcomp_ext.integrations import transformers as mod

    calls = []
    monkeypatch.setattr(mc, "image_text_contrastive_loss", lambda *a: calls.append("upstream") or 1 / 0)
    real = mod.infonce_loss
    monkeypatch.setattr(mod, "infonce_loss", lambda *a, **k: calls.append("fused") or real(*a, **k))
    sc_hf.patch()
    out = build("clip")(**inputs(), return_loss=True)
    assert calls == ["fused"] and out.loss.requires_grad


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tuple_outputs_and_positional_return_loss(kind):
    model = build(kind).eval()
    ref = model(**inputs(), return_loss=True, return_dict=False)
    sc_hf.patch()
    ours = model(**inputs(), return_loss=True, return_dict=False)
    assert isinstance(ours, tuple) and len(ours) == len(ref)
    assert abs(float(ours[0].detach()) - float(ref[0].detach())) <= TOL
    for a, b in zip(ours[1:5], ref[1:5]):
        assert torch.equal(a, b)
    x = inputs()
    # forward(input_ids, pixel_values, attention_mask, position_ids, return_loss)
    pos = model(x["input_ids"], x["pixel_values"], None, None, True)
    assert abs(float(pos.loss.detach()) - float(ref[0].detach())) <= TOL
    assert model(**x).loss is None  # return_loss not asked: nothing computed


def test_patch_and_unpatch_are_idempotent():
    originals = (CLIPModel.forward, SiglipModel.forward)
    assert not sc_hf.is_patched()
    sc_hf.patch()
    patched = (CLIPModel.forward, SiglipModel.forward)
    sc_hf.patch()
    assert (CLIPModel.forward, SiglipModel.forward) == patched and sc_hf.is_patched()
    assert all(getattr(f, "__semcomp_fused__", False) for f in patched)
    sc_hf.unpatch()
    assert (CLIPModel.forward, SiglipModel.forward) == originals and not sc_hf.is_patched()
    sc_hf.unpatch()
    assert (CLIPModel.forward, SiglipModel.forward) == originals


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="outputs_or_embeds"):
        sc_hf.clip_loss(torch.randn(3, 4), 1.0)
    with pytest.raises(ValueError, match="logit_bias"):
        sc_hf.siglip_loss((torch.randn(3, 4), torch.randn(3, 4)), torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        sc_hf.clip_loss((torch.randn(3, 4), torch.randn(3, 4)), torch.nn.Linear(2, 2))
