"""attnkit.pooling: the trainable poolings against a float64 written-out reference (forward and every
gradient), against the official PerceiverResampler math (holdout, written from its reading), the
baselines, the hidden-state helpers, the retrieval metric and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit import cards
from attnkit.models import DecoderLM
from attnkit.pooling import (CARDS, LastTokenPooling, MeanPooling, TrainablePooling, contrastive_loss,
                             decoder_hidden_states, layer_means, recall_at)
from attnkit.tasks.pairs import function_pairs


def _randomise(module):
    with torch.no_grad():  # LayerNorm's 1/0 and zero biases would hide a wrong parameter
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def _inputs(batch=3, layers=4, tokens=6, dim=32):
    torch.manual_seed(1)
    hidden = torch.randn(batch, layers, tokens, dim, dtype=torch.float64)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    return hidden, mask


@pytest.mark.parametrize("source", ["all-layers", "last-layer"])
def test_fast_path_matches_reference_forward_and_gradients(source):
    torch.manual_seed(0)
    fast = _randomise(TrainablePooling(32, 4, num_heads=4, num_latents=3, source=source)).double()
    ref = TrainablePooling(32, 4, num_heads=4, num_latents=3, source=source, backend="reference").double()
    ref.load_state_dict(fast.state_dict())
    hidden, mask = _inputs()
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    y, y_ref = fast(h1, mask), ref(h2, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


def _official(hidden_summary, latents, p, heads, dim_head, layer_pos=None):
    """The official PerceiverResampler (MultiLayersTrainablePooling.py) written from its reading, float64:
    PreNorm LayerNorms on the context (its ``x``) and the latents (its ``context``), q from the latents and
    k, v from the context, SDPA's 1/sqrt(dim_head), to_out, residual; GEGLU FF under PreNorm, residual;
    mean over latents; L2 normalise."""
    x = hidden_summary if layer_pos is None else hidden_summary + layer_pos
    B = x.shape[0]
    lat = latents.expand(B, -1, -1)
    xn = F.layer_norm(x, x.shape[-1:], p["norm_context.weight"], p["norm_context.bias"])
    ln = F.layer_norm(lat, lat.shape[-1:], p["norm_latents.weight"], p["norm_latents.bias"])
    q = ln @ p["to_q.weight"].T
    k, v = (xn @ p["to_kv.weight"].T).chunk(2, dim=-1)
    split = lambda t: t.reshape(B, t.shape[1], heads, dim_head).permute(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    w = torch.softmax(q @ k.transpose(-1, -2) * dim_head ** -0.5, dim=-1)
    out = (w @ v).permute(0, 2, 1, 3).reshape(B, -1, heads * dim_head)
    z = out @ p["to_out.weight"].T + lat
    zn = F.layer_norm(z, z.shape[-1:], p["norm_ff.weight"], p["norm_ff.bias"])
    a, gate = (zn @ p["ff.up.weight"].T + p["ff.up.bias"]).chunk(2, dim=-1)
    z = (a * F.gelu(gate)) @ p["ff.down.weight"].T + p["ff.down.bias"] + z
    return F.normalize(z.mean(dim=1), p=2, dim=-1)


def test_holdout_official_multi_layer_math():
    """The official model5 path: per-layer masked token means (layers 1..L) -> PerceiverResampler."""
    torch.manual_seed(0)
    pool = _randomise(TrainablePooling(32, 4, num_heads=2, head_dim=8, num_latents=5)).double()
    hidden, mask = _inputs()
    p = dict(pool.named_parameters())
    # the official loader: sum(h * mask) / sum(mask) per layer, stacked (B, L, C)
    m = mask[:, :, None].double()
    summary = torch.stack([(hidden[:, l] * m).sum(1) / m.sum(1) for l in range(hidden.shape[1])], dim=1)
    expected = _official(summary, p["latents"], p, 2, 8, layer_pos=p["layer_embedding.weight"])
    torch.testing.assert_close(pool(hidden, mask), expected, rtol=1e-10, atol=1e-12)


def test_holdout_official_last_layer_math_without_padding():
    """The official model4 path (LastLayersTrainablePooling over last_hidden_state, no mask): equal
    when nothing is padded."""
    torch.manual_seed(0)
    pool = _randomise(TrainablePooling(32, 4, num_heads=4, num_latents=3, source="last-layer")).double()
    hidden, _ = _inputs()
    p = dict(pool.named_parameters())
    expected = _official(hidden[:, -1], p["latents"], p, 4, 8)
    torch.testing.assert_close(pool(hidden), expected, rtol=1e-10, atol=1e-12)
    assert pool.layer_embedding is None


def test_padding_is_ignored():
    """Padded tokens change neither the layer means nor the last-layer attention nor the baselines."""
    torch.manual_seed(0)
    hidden, mask = _inputs()
    noisy = hidden.clone()
    noisy[~mask[:, None, :, None].expand_as(hidden)] = 1e3
    for pool in (TrainablePooling(32, 4), TrainablePooling(32, 4, source="last-layer"), LastTokenPooling(32),
                 MeanPooling(32)):
        pool = pool.double()
        torch.testing.assert_close(pool(hidden, mask), pool(noisy, mask))


def test_baselines_read_what_they_say():
    hidden, mask = _inputs()
    last = LastTokenPooling(32, normalize=False).double()
    with torch.no_grad():
        last.proj.weight.copy_(torch.eye(32))
        last.proj.bias.zero_()
    out = last(hidden, mask)
    torch.testing.assert_close(out[0], hidden[0, -1, 5])
    torch.testing.assert_close(out[1], hidden[1, -1, 3])
    torch.testing.assert_close(out[2], hidden[2, -1, 0])
    mean = MeanPooling(32, normalize=False).double()
    with torch.no_grad():
        mean.proj.weight.copy_(torch.eye(32))
        mean.proj.bias.zero_()
    torch.testing.assert_close(mean(hidden, mask)[1], hidden[1, -1, :4].mean(0))
    torch.testing.assert_close(layer_means(hidden, mask)[1, 2], hidden[1, 2, :4].mean(0))


def test_attention_weights_over_layers_are_exposed_and_unit_norm():
    pool = TrainablePooling(32, 4, num_latents=3).double()
    hidden, mask = _inputs()
    out = pool(hidden, mask)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert pool.last_weights.shape == (3, 4, 3, 4)  # (B, H, latents, layers)
    torch.testing.assert_close(pool.last_weights.sum(-1), torch.ones(3, 4, 3, dtype=torch.float64))


def test_decoder_hidden_states_match_the_model():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=32, dim=32, num_layers=3, num_heads=4, attention="mha").eval()
    tokens = torch.randint(0, 32, (2, 9))
    states = decoder_hidden_states(model, tokens)
    assert states.shape == (2, 3, 9, 32)
    torch.testing.assert_close(states[:, -1], model.hidden(tokens))


def test_contrastive_loss_and_recall():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(16, 8), dim=-1)
    assert recall_at(a, a) == {1: 1.0, 10: 1.0}
    assert recall_at(a, a.roll(1, 0), ks=(1,))[1] == 0.0
    assert contrastive_loss(a, a, 0.01) < contrastive_loss(a, a.roll(1, 0), 0.01)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        contrastive_loss(a, a, 0)
    with pytest.raises(ValueError, match=r"a and b must be \(B, C\) of one shape"):
        contrastive_loss(a, a[:3])


def test_function_pairs_from_the_stdlib():
    pairs = function_pairs(max_pairs=50, max_bytes=40)
    assert len(pairs) == 50 and all(len(d) <= 40 and len(c) <= 40 for d, c in pairs)
    assert all(c.startswith(b"def ") or c.startswith(b"async def ") or c.startswith(b"@") for _, c in pairs)
    assert function_pairs(max_pairs=50, max_bytes=40) == pairs  # seeded
    with pytest.raises(ValueError, match="max_pairs must be a positive integer, got 0"):
        function_pairs(max_pairs=0)
    with pytest.raises(ValueError, match="root must be a folder"):
        function_pairs("/nonexistent/place")


def test_cards():
    assert "pooling" in cards.KINDS
    assert [c.name for c in CARDS] == ["multi-layer-pooling", "last-layer-pooling", "last-token-pooling", "mean-pooling"]
    for card in CARDS:
        assert card.kind == "pooling" and card.family == "pooling"
        pool = card.build(32, 4)
        hidden, mask = _inputs(layers=12)
        assert pool.double()(hidden, mask).shape == (3, 32)
        flops = card.flop_count(2, 80, 32, 4)
        assert flops.fwd > 0
    # the multi-layer head attends over L keys, the last-layer head over T: its attention grows with T
    ml, ll = CARDS[0], CARDS[1]
    assert ml.flop_count(1, 800, 32, 4).attention_fwd == ml.flop_count(1, 80, 32, 4).attention_fwd
    assert ll.flop_count(1, 800, 32, 4).attention_fwd == 10 * ll.flop_count(1, 80, 32, 4).attention_fwd


BAD = [
    (dict(dim=0, num_layers=2), "dim must be a positive integer, got 0"),
    (dict(dim=32, num_layers=2.0), "num_layers must be a positive integer, got 2.0"),
    (dict(dim=30, num_layers=2, num_heads=4), r"dim \(30\) must be divisible by num_heads \(4\)"),
    (dict(dim=32, num_layers=2, source="first"), "source must be one of all-layers, last-layer, got 'first'"),
    (dict(dim=32, num_layers=2, backend="flex"), "backend must be one of sdpa, reference, got 'flex'"),
    (dict(dim=32, num_layers=2, num_latents=True), "num_latents must be a positive integer, got True"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainablePooling(**kwargs)


def test_bad_calls():
    pool = TrainablePooling(32, 4)
    hidden = torch.randn(2, 4, 5, 32)
    with pytest.raises(ValueError, match=r"hidden must be a tensor \(B, L, T, C\).*got \(2, 5, 32\)"):
        pool(hidden[:, 0])
    with pytest.raises(ValueError, match="hidden's width 16 differs from the pooling's dim 32"):
        pool(torch.randn(2, 4, 5, 16))
    with pytest.raises(ValueError, match="hidden has 5 layers, the pooling was built for num_layers=4"):
        pool(torch.randn(2, 5, 5, 32))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \(B, T\) = \(2, 5\)"):
        pool(hidden, torch.ones(2, 5))
    with pytest.raises(ValueError, match="every sequence needs at least one real token"):
        pool(hidden, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"hidden must be a tensor \(B, L, T, C\).*got list"):
        MeanPooling(32)([1, 2])
