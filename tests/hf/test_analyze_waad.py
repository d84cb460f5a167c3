"""attnkit analyze waad: WAAD, FAI, head classes, preplan / anchor tokens, credit weights (issue 25, item 2)."""

import pytest
import torch

from hf_models import tiny

pytest.importorskip("attnkit.hf")
from attnkit.analysis.hf.waad import (  # noqa: E402
    classify_heads,
    credit_weights,
    fai,
    mark_tokens,
    mean_distance,
    waad,
    waad_analysis,
)

A = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                  [0.5, 0.5, 0.0, 0.0],
                  [0.2, 0.3, 0.5, 0.0],
                  [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)


def test_waad_by_hand():
    # WAAD_t = sum_s A[t, s] min(t - s, W)
    assert waad(A, window=10).tolist() == pytest.approx([0.0, 0.5, 0.2 * 2 + 0.3, 0.1 * 3 + 0.2 * 2 + 0.3])
    assert waad(A, window=2).tolist() == pytest.approx([0.0, 0.5, 0.7, 0.1 * 2 + 0.2 * 2 + 0.3])
    assert waad(A[None, None].expand(2, 3, 4, 4), 10).shape == (2, 3, 4)


def test_fai_by_hand():
    # FAI_s = mean over the later queries of A[t, s]
    assert fai(A, exclude=0).tolist() == pytest.approx([(0.5 + 0.2 + 0.1) / 3, (0.3 + 0.2) / 2, 0.3, 0.0])
    assert fai(A, exclude=1).tolist() == fai(A, exclude=0).tolist()
    # exclude = 2: only queries at least 2 tokens later count
    assert fai(A, exclude=2).tolist() == pytest.approx([(0.2 + 0.1) / 2, 0.2, 0.0, 0.0])


def test_mean_distance_by_hand():
    assert float(mean_distance(A, sink=0)) == pytest.approx((0 + 0.5 + 0.7 + 1.0) / 4)
    # key 0 left out, rows renormalised: [1], [0.3, 0.5] / 0.8, [0.2, 0.3, 0.4] / 0.9 over queries 1..3
    expect = (0 + 0.3 / 0.8 * 1 + (0.2 * 2 + 0.3 * 1) / 0.9) / 3
    assert float(mean_distance(A, sink=1)) == pytest.approx(expect)


def test_classify_heads():
    assert classify_heads([[1.0, 5.0], [3.0, 9.0]], fraction=0.25) == [["local", "mixed"], ["mixed", "global"]]
    assert classify_heads([[1.0, 5.0], [3.0, 9.0]], fraction=0.5) == [["local", "global"], ["local", "global"]]


WAAD_T = torch.tensor([0.0, 5.0, 1.0, 1.0, 6.0, 2.0, 2.0, 2.0])
FAI_T = torch.tensor([0.1, 0.2, 0.1, 0.1, 0.3, 0.9, 0.1, 0.05])


def test_mark_tokens_by_hand():
    marks = mark_tokens(WAAD_T, FAI_T, top=0.25, span=3)
    # jumps WAAD_t - WAAD_{t-1}: +5 at 1 and at 4 (the top 2 of 8); FAI's top 2: 5 and 4
    assert marks["preplan"].nonzero().flatten().tolist() == [1, 4]
    assert marks["anchor"].nonzero().flatten().tolist() == [4, 5]
    # preplan 1 leads into anchor 4 (3 tokens later), preplan 4 coincides with anchor 4 and precedes 5
    assert marks["coupled"].nonzero().flatten().tolist() == [1, 4, 5]
    assert mark_tokens(WAAD_T, FAI_T, top=0.25, span=0)["coupled"].nonzero().flatten().tolist() == [4]


def test_credit_weights_for_a_trainer():
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :2] = False  # row 1: the first two tokens are prompt
    w = credit_weights(torch.stack([WAAD_T, WAAD_T]), torch.stack([FAI_T, FAI_T]), mask, strategy="anchor",
                       gamma=2.0, top=0.25)
    assert w.dtype == torch.float32 and w.shape == (2, 8)
    assert w[0].tolist() == [1, 1, 1, 1, 2, 2, 1, 1]
    assert w[1].tolist() == [0, 0, 1, 1, 2, 2, 1, 1]  # top 25% of 6 masked tokens: 2 (ceil 1.5)
    assert credit_weights(WAAD_T, FAI_T, strategy="preplan", gamma=3.0, top=0.25).tolist() == [1, 3, 1, 1, 3, 1, 1, 1]
    n = credit_weights(torch.stack([WAAD_T, WAAD_T]), torch.stack([FAI_T, FAI_T]), mask, gamma=2.0, top=0.25,
                       normalize=True)
    assert (n.sum(-1) / mask.sum(-1)).tolist() == pytest.approx([1.0, 1.0])
    # what a GRPO trainer does with them: sequence advantages [B] -> per-token [B, T]
    advantages = torch.tensor([0.5, -1.0])
    per_token = advantages[:, None] * w
    assert per_token[1, 4].item() == -2.0 and per_token[1, 0].item() == 0.0


def test_waad_analysis_matches_eager_attention():
    model = tiny("llama", num_hidden_layers=2)
    eager = tiny("llama")
    eager.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (1, 24), generator=torch.Generator().manual_seed(1))
    report = waad_analysis(model, ids, window=4, exclude=2, fraction=0.25, start=8)
    with torch.no_grad():
        att = torch.stack(eager(ids, output_attentions=True).attentions)[:, 0].double()  # (L, H, T, T)
    dist = mean_distance(att, sink=1)
    torch.testing.assert_close(torch.tensor(report["mean_distance"], dtype=torch.float64), dist, atol=1e-6, rtol=0)
    classes = classify_heads(dist, 0.25)
    local = torch.tensor([[c == "local" for c in row] for row in classes])
    glob = torch.tensor([[c == "global" for c in row] for row in classes])
    assert report["waad"] == pytest.approx(waad(att[local], 4).mean(0).tolist(), abs=1e-6)
    assert report["fai"] == pytest.approx(fai(att[glob], 2).mean(0).tolist(), abs=1e-6)
    assert all(t >= 8 for t in report["preplan"] + report["anchor"])


def test_bad_input():
    with pytest.raises(ValueError, match="mask selects no token"):
        credit_weights(WAAD_T, FAI_T, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="strategy must be one of preplan, anchor, coupled, got 'all'"):
        credit_weights(WAAD_T, FAI_T, strategy="all")
    with pytest.raises(ValueError, match="gamma must be a number > 0"):
        credit_weights(WAAD_T, FAI_T, gamma=0)
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        waad(A, window=0)
    with pytest.raises(ValueError, match=r"causal attention map \[..., T, T\]"):
        fai(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"top must be a fraction in \(0, 1\]"):
        mark_tokens(WAAD_T, FAI_T, top=0)
    with pytest.raises(ValueError, match="waad and fai must be"):
        mark_tokens(WAAD_T, FAI_T[:4])
    with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 0.5\]"):
        classify_heads([[1.0]], fraction=0.9)
    with pytest.raises(ValueError, match="sink must be < the number of tokens"):
        mean_distance(A, sink=4)
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"start must be an integer in \[0, 6\)"):
        waad_analysis(model, torch.ones(1, 6, dtype=torch.long), start=6)
    with pytest.raises(ValueError, match=r"input_ids must be one sequence \[1, T\]"):
        waad_analysis(model, torch.ones(2, 6, dtype=torch.long))
