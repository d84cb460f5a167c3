"""attnkit analyze sinks: first-token metrics and massive activations, by hand (issue 25, item 1)."""

import pytest
import torch

from hf_models import tiny

pytest.importorskip("attnkit.hf")
from attnkit.analysis.hf.sinks_hf import massive_activations, received_attention, sink_analysis  # noqa: E402
from attnkit.analysis.sinks import first_token_metrics  # noqa: E402

# rows: queries 0..2; causal
A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])[None, None]  # (1, 1, 3, 3)


def test_first_token_metrics_by_hand():
    m = first_token_metrics(A, epsilon=0.3)
    # queries i >= 1 put 0.5 and 0.2 on token 0: mean 0.35 (rows sum to 1, so share = weight)
    assert m["weight"].tolist() == pytest.approx([0.35])
    assert m["share"].tolist() == pytest.approx([0.35])
    assert m["sink"].tolist() == [True]
    assert first_token_metrics(A, epsilon=0.4)["sink"].tolist() == [False]
    # rows that do not sum to 1 (sigmoid attention): share = w_i0 / row sum
    m = first_token_metrics(A * torch.tensor([1.0, 2.0, 1.0])[:, None], epsilon=0.3)
    assert m["weight"].tolist() == pytest.approx([(1.0 + 0.2) / 2])
    assert m["share"].tolist() == pytest.approx([0.35])


def test_received_attention_by_hand():
    # key 0 is seen by 3 queries (1 + 0.5 + 0.2), key 1 by 2 (0.5 + 0.3), key 2 by 1 (0.5)
    assert received_attention(A).tolist() == pytest.approx([1.7 / 3, 0.8 / 2, 0.5])


def test_massive_activations_by_hand():
    h = torch.ones(1, 4, 4)
    h[0, 2, 1] = -1000.0  # magnitude counts, not sign
    h[0, 3, 0] = 50.0  # 50 x the median: below the ratio
    out = massive_activations([h, torch.ones(1, 4, 4)], ratio=100)
    assert [t["position"] for t in out["tokens"]] == [2]
    token = out["tokens"][0]
    assert token["dims"] == [1] and token["layers"] == [0]
    assert token["max_ratio"] == pytest.approx(1000.0) and token["max_magnitude"] == pytest.approx(1000.0)
    assert out["per_layer"][0] == {"layer": 0, "median": 1.0, "max_ratio": 1000.0, "position": 2, "dim": 1}
    assert [t["position"] for t in massive_activations([h], ratio=40)["tokens"]] == [2, 3]
    assert massive_activations([h], ratio=100, min_magnitude=2000)["tokens"] == []


def test_sink_analysis_matches_eager_attention():
    model = tiny("llama")
    eager = tiny("llama")
    eager.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    report = sink_analysis(model, ids)
    with torch.no_grad():
        ref = eager(ids, output_attentions=True).attentions
    for row in report["layers"]:
        m = first_token_metrics(ref[row["layer"]])
        assert row["head_share"] == pytest.approx(m["share"].tolist(), abs=1e-6)
        assert row["first_token_share"] == pytest.approx(float(m["share"].mean()), abs=1e-6)
    assert len(report["received_attention"]) == 10


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] with T >= 2, got \(1, 1\)"):
        sink_analysis(model, torch.ones(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\), got 1.5"):
        sink_analysis(model, torch.ones(1, 4, dtype=torch.long), epsilon=1.5)
    with pytest.raises(ValueError, match="ratio must be a number > 1"):
        massive_activations([torch.ones(1, 2, 2)], ratio=0.5)
    with pytest.raises(ValueError, match="hidden_states must hold at least one"):
        massive_activations([])
    with pytest.raises(ValueError, match=r"batch=3 in \[0, B\)"):
        massive_activations([torch.ones(1, 2, 2)], batch=3)
    with pytest.raises(ValueError, match=r"weights must be \[B, H, T, S\] with T >= 2"):
        first_token_metrics(torch.ones(1, 1, 1, 1))


def test_massive_tokens_get_their_received_attention(monkeypatch):
    import attnkit.analysis.hf.sinks_hf as sinks_hf

    model = tiny("llama")
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    real = sinks_hf.massive_activations

    def fake(hidden_states, **kw):  # token 2 made massive in the first layer's output
        hidden = [h.clone() for h in hidden_states]
        hidden[0][0, 2, 5] = 1e6
        return real(hidden, **kw)

    monkeypatch.setattr(sinks_hf, "massive_activations", fake)
    report = sinks_hf.sink_analysis(model, ids)
    token = report["massive"]["tokens"][0]
    assert report["in_sequence_sinks"] == [2] and token["dims"] == [5]
    assert token["received_attention"] == pytest.approx(report["received_attention"][2])
    assert token["uniform_attention"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 5 + 1 / 6) / 4)  # rows 2..5 uniform
