"""Attention vs attribution (issue 25, item 3): rollout and raw attention on hand-computed matrices,
the rank correlations against hand values (and scipy when installed), integrated gradients'
completeness, zero effect at the baseline, explain() on a tiny random Llama, bad inputs, the CLI."""

import argparse
import json
import math

import pytest
import torch
from hf_models import tiny

pytest.importorskip("transformers")

from attnkit.analysis.hf.attribution import (  # noqa: E402
    METHODS,
    add_parser,
    agreement,
    attention_rollout,
    explain,
    integrated_gradients,
    kendall_tau,
    last_layer_attention,
    occlusion,
    pearson_r,
    rankdata,
    spearman_rho,
    summarize,
)


def _eager_llama(dtype=torch.float64):
    model = tiny("llama", dtype=dtype)
    model.set_attn_implementation("eager")
    return model


# -- attention-based explanations ---------------------------------------------------------------------


# two layers, two heads each, 3 tokens (causal); the head means are
#   A1 = [[1, 0, 0], [.5, .5, 0], [.5, .25, .25]]   A2 = [[1, 0, 0], [1, 0, 0], [0, .5, .5]]
A1_HEADS = torch.tensor([[[1, 0, 0], [1, 0, 0], [1, 0, 0]],
                         [[1, 0, 0], [0, 1, 0], [0, 0.5, 0.5]]], dtype=torch.float64)
A2_HEADS = torch.tensor([[[1, 0, 0], [1, 0, 0], [0, 1, 0]],
                         [[1, 0, 0], [1, 0, 0], [0, 0, 1]]], dtype=torch.float64)


def test_rollout_of_a_three_token_two_layer_example_by_hand():
    # Ã1 = .5 A1 + .5 I = [[1,0,0],[.25,.75,0],[.25,.125,.625]];  Ã2 = [[1,0,0],[.5,.5,0],[0,.25,.75]]
    # R = Ã2 Ã1: row 1 = .5[1,0,0] + .5[.25,.75,0] = [.625,.375,0]
    #            row 2 = .25[.25,.75,0] + .75[.25,.125,.625] = [.25,.28125,.46875]
    expected = torch.tensor([[1, 0, 0], [0.625, 0.375, 0], [0.25, 0.28125, 0.46875]], dtype=torch.float64)
    rollout = attention_rollout([A1_HEADS, A2_HEADS[None]])  # a batch dimension of 1 is accepted
    torch.testing.assert_close(rollout, expected, rtol=0, atol=1e-15)
    # residual 1: only the residual stream, nothing mixes
    torch.testing.assert_close(attention_rollout([A1_HEADS, A2_HEADS], residual=1.0), torch.eye(3, dtype=torch.float64))
    # head 1 only: Ã1 = [[1,0,0],[0,1,0],[0,.25,.75]], Ã2 = [[1,0,0],[.5,.5,0],[0,0,1]] -> row 2 = [0,.25,.75]
    torch.testing.assert_close(attention_rollout([A1_HEADS, A2_HEADS], heads=[1])[2],
                               torch.tensor([0, 0.25, 0.75], dtype=torch.float64))


def test_rollout_renormalises_rows_that_do_not_sum_to_one():
    # a row of zeros (a fully masked query) becomes the identity's row, 0.5 renormalised to 1
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(attention_rollout([a]), torch.eye(2, dtype=torch.float64))
    # row 0 = [.4, .4] (sums to .8): .5 [.4, .4] + .5 [1, 0] = [.7, .2], renormalised [7/9, 2/9]
    b = torch.tensor([[[0.4, 0.4], [0.5, 0.5]]], dtype=torch.float64)
    torch.testing.assert_close(attention_rollout([b])[0], torch.tensor([7 / 9, 2 / 9], dtype=torch.float64))


def test_last_layer_attention_is_the_head_mean_of_the_row():
    torch.testing.assert_close(last_layer_attention([A1_HEADS, A2_HEADS]), torch.tensor([0, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(last_layer_attention([A1_HEADS, A2_HEADS], layer=0, position=1),
                               torch.tensor([0.5, 0.5, 0], dtype=torch.float64))
    torch.testing.assert_close(last_layer_attention([A1_HEADS, A2_HEADS], heads=1), torch.tensor([0, 0, 1.0], dtype=torch.float64))


# -- rank correlations -----------------------------------------------------------------------------------


def test_rank_correlations_by_hand():
    assert rankdata([0, 2, 3, 2]).tolist() == [1, 2.5, 4, 2.5]
    # [1,2,3] vs [1,3,2]: pairs (0,1) and (0,2) concordant, (1,2) discordant -> tau = 1/3;
    # rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 24 = 0.5
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3, abs=1e-15)
    assert spearman_rho([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5, abs=1e-15)
    # with ties: x = [1,1,2], y = [1,2,3]: sum s^x s^y = 0 + 1 + 1 = 2, sum s^x^2 = 2, sum s^y^2 = 3 -> 2 / sqrt(6)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6), abs=1e-15)
    # ranks [1.5,1.5,3] vs [1,2,3]: Pearson = 1.5 / sqrt(1.5 * 2)
    assert spearman_rho([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3), abs=1e-15)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1 and spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3])) and math.isnan(spearman_rho([1, 2, 3], [5, 5, 5]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # scipy's ConstantInputWarning on the constant cases
def test_rank_correlations_match_scipy_on_fixed_data():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 10, 57):
        x = torch.randint(0, 6, (n,), generator=g).double()  # many ties
        y = torch.randn(n, generator=g, dtype=torch.float64)
        if n > 3:
            y[:3] = y[3]
        for a, b in ((x, y), (y, x), (x, x), (y, -y)):
            assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a.numpy(), b.numpy()).statistic, abs=1e-12, nan_ok=True)
            assert spearman_rho(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12, nan_ok=True)
        assert rankdata(x).tolist() == stats.rankdata(x.numpy()).tolist()


def test_rank_correlations_reproduce_scipy_documented_values():
    # the examples of scipy.stats.kendalltau's and spearmanr's documentation (ties in both)
    assert kendall_tau([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173, abs=1e-12)
    assert spearman_rho([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233, abs=1e-12)


def test_agreement_and_summary():
    scores = {"a": torch.tensor([3.0, -2.0, 1.0]), "b": torch.tensor([1.0, 2.0, 3.0]), "c": torch.tensor([0.1, 0.2, 0.3])}
    result = agreement(scores)
    assert list(result) == [("a", "b"), ("a", "c"), ("b", "c")]
    # |a| = [3, 2, 1] is the reverse of b; signed a = [3, -2, 1] vs b: pairs (+,-), (-, -)... tau = -1/3
    assert result["a", "b"]["kendall_tau"] == pytest.approx(-1)
    assert agreement(scores, absolute=False)["a", "b"]["kendall_tau"] == pytest.approx(-1 / 3)
    assert result["b", "c"]["spearman_rho"] == pytest.approx(1)
    assert agreement(scores, tokens=[0, 1])["a", "b"]["kendall_tau"] == pytest.approx(-1)
    assert agreement(scores, tokens=torch.tensor([True, False, True]))["b", "c"]["kendall_tau"] == pytest.approx(1)
    summary = summarize([result, agreement({k: v.flip(0) for k, v in scores.items()})])
    assert summary["a", "b"]["kendall_tau"] == {"mean": pytest.approx(-1), "std": pytest.approx(0), "n": 2}
    # constant scores: NaN per example, left out of the summary; one value has no std
    flat = agreement({"a": torch.ones(3), "b": torch.tensor([1.0, 2, 3])})
    assert math.isnan(flat["a", "b"]["kendall_tau"])
    assert summarize([flat, flat])["a", "b"]["kendall_tau"] == {"mean": None, "std": None, "n": 0}
    assert summarize([flat, result])["a", "b"]["spearman_rho"] == {"mean": pytest.approx(-1), "std": None, "n": 1}


# -- feature attributions ---------------------------------------------------------------------------------


def test_integrated_gradients_of_a_quadratic_by_hand():
    # f(e) = sum e^2, zero baseline: IG_i = e_i * int_0^1 2 a e_i da = e_i^2 exactly (Gauss-Legendre is exact
    # on polynomials), so the token scores are the rows' squared norms [1 + 4, 9 + 0]
    e = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    ig = integrated_gradients(lambda x: (x**2).sum((1, 2)), e, torch.zeros_like(e), steps=2)
    torch.testing.assert_close(ig, torch.tensor([5.0, 9.0], dtype=torch.float64))


def test_integrated_gradients_completeness_on_a_tiny_llama():
    model = _eager_llama()
    ids = torch.randint(1, 128, (12,), generator=torch.Generator().manual_seed(1))
    # a token's embedding as the baseline: the path stays away from zero, where a pre-norm model's
    # RMSNorm makes f nearly a step (the all-zero baseline needs hundreds of nodes there)
    for baseline, target in ((0, None), (3, 5), (100, 17)):
        ex = explain(model, ids, target, methods=("integrated_gradients",), steps=32, baseline=baseline)
        delta = ex.f_input - ex.f_baseline
        assert abs(delta) > 1e-3
        assert float(ex.scores["integrated_gradients"].sum()) == pytest.approx(delta, rel=1e-5)


def test_zero_effect_when_the_input_equals_the_baseline():
    model = _eager_llama()
    ids = torch.randint(1, 128, (9,), generator=torch.Generator().manual_seed(2))
    embeds = model.get_input_embeddings()(ids).detach()
    ex = explain(model, ids, methods=("integrated_gradients", "occlusion"), baseline=embeds.clone(), steps=4)
    # two forward passes of the same input: equal up to rounding (threaded reductions may differ by an ulp)
    assert ex.f_input == pytest.approx(ex.f_baseline, rel=1e-12, abs=1e-12)
    zeros = torch.zeros(9, dtype=torch.float64)
    torch.testing.assert_close(ex.scores["integrated_gradients"], zeros, rtol=0, atol=1e-12)
    torch.testing.assert_close(ex.scores["occlusion"], zeros, rtol=0, atol=1e-12)
    # a repeated token with its own embedding as the baseline: occluding it changes nothing
    ids = torch.full((6,), 7)
    ex = explain(model, ids, methods=("occlusion",), baseline=7)
    torch.testing.assert_close(ex.scores["occlusion"], torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_explain_on_a_tiny_llama_matches_direct_computations():
    model = _eager_llama()
    ids = torch.randint(1, 128, (10,), generator=torch.Generator().manual_seed(3))
    ex = explain(model, ids, baseline=0, steps=8, batch=3)
    assert list(ex.scores) == list(METHODS) and all(s.shape == (10,) and s.dtype == torch.float64 for s in ex.scores.values())
    with torch.no_grad():
        out = model(ids[None], output_attentions=True)
    assert ex.target == int(out.logits[0, -1].argmax())
    assert ex.f_input == pytest.approx(float(out.logits[0, -1, ex.target]), abs=1e-12)
    torch.testing.assert_close(ex.scores["attention"], out.attentions[-1][0, :, -1].mean(0))
    assert float(ex.scores["rollout"].sum()) == pytest.approx(1.0)
    # gradient and input x gradient from one autograd call; occlusion of token 4 by hand
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds[None]).logits[0, -1, ex.target].backward()
    torch.testing.assert_close(ex.scores["gradient"], embeds.grad.norm(dim=-1))
    torch.testing.assert_close(ex.scores["input_x_gradient"], (embeds * embeds.grad).sum(-1).detach())
    occluded = embeds.detach().clone()
    occluded[4] = model.get_input_embeddings().weight[0].detach()
    with torch.no_grad():
        drop = ex.f_input - float(model(inputs_embeds=occluded[None]).logits[0, -1, ex.target])
    assert float(ex.scores["occlusion"][4]) == pytest.approx(drop, abs=1e-12)
    # occlusion in chunks equals occlusion in one batch
    f = lambda x: model(inputs_embeds=x).logits[:, -1, ex.target]  # noqa: E731
    torch.testing.assert_close(occlusion(f, embeds.detach(), occluded * 0, batch=2), occlusion(f, embeds.detach(), occluded * 0, batch=64))


def test_integrated_gradients_match_captum_when_installed():
    captum = pytest.importorskip("captum.attr")
    model = _eager_llama()
    ids = torch.randint(1, 128, (8,), generator=torch.Generator().manual_seed(4))
    ex = explain(model, ids, methods=("integrated_gradients",), steps=32, baseline="zero")
    embeds = model.get_input_embeddings()(ids).detach()[None]
    ig = captum.IntegratedGradients(lambda x: model(inputs_embeds=x).logits[:, -1, ex.target])
    theirs = ig.attribute(embeds, baselines=torch.zeros_like(embeds), n_steps=32, method="gausslegendre").sum(-1)[0]
    torch.testing.assert_close(ex.scores["integrated_gradients"], theirs.double(), rtol=1e-6, atol=1e-8)


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, words", [
    (lambda: last_layer_attention([A1_HEADS, A2_HEADS], layer=2), ["layer", "2", "[-2, 1]"]),
    (lambda: last_layer_attention([A1_HEADS, A2_HEADS], layer=-3), ["layer", "-3", "[-2, 1]"]),
    (lambda: last_layer_attention([A1_HEADS, A2_HEADS], heads=[0, 2]), ["heads", "2", "[0, 1]"]),
    (lambda: last_layer_attention([A1_HEADS, A2_HEADS], heads=[]), ["heads", "empty"]),
    (lambda: last_layer_attention([A1_HEADS, A2_HEADS], position=3), ["position", "3", "[-3, 2]"]),
    (lambda: attention_rollout([A1_HEADS], heads=5), ["heads", "5", "[0, 1]"]),
    (lambda: attention_rollout([A1_HEADS], residual=1.5), ["residual", "1.5", "[0, 1]"]),
    (lambda: attention_rollout([]), ["attentions", "empty"]),
    (lambda: attention_rollout([None]), ["attentions[0]", "eager"]),
    (lambda: agreement({"a": torch.ones(3), "b": torch.ones(3)}, tokens=[]), ["tokens", "0 token", "at least 2"]),
    (lambda: agreement({"a": torch.ones(3), "b": torch.ones(3)}, tokens=torch.zeros(3, dtype=torch.bool)), ["tokens", "0 token"]),
    (lambda: agreement({"a": torch.ones(3), "b": torch.ones(3)}, tokens=[0, 5]), ["tokens", "[-3, 2]", "5"]),
    (lambda: agreement({"a": torch.ones(3)}), ["at least 2 methods"]),
    (lambda: agreement({"a": torch.ones(3), "b": torch.ones(4)}), ["same tokens", "'b': 4"]),
    (lambda: kendall_tau([1, 2], [1, 2, 3]), ["same length", "(2,)", "(3,)"]),
    (lambda: spearman_rho([1], [1]), ["at least 2", "1"]),
    (lambda: summarize([]), ["per_example", "empty"]),
    (lambda: integrated_gradients(lambda x: x.sum((1, 2)), torch.ones(2, 2), torch.zeros(2, 2), steps=0), ["steps", "0"]),
])
def test_bad_input_names_argument_value_and_range(call, words):
    with pytest.raises(ValueError) as err:
        call()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_explain_bad_input():
    model = _eager_llama(torch.float32)
    ids = torch.arange(1, 6)
    cases = [
        (dict(layer=2), ["layer", "2", "[-2, 1]"]),
        (dict(heads=[4]), ["heads", "4", "[0, 3]"]),
        (dict(position=5), ["position", "5", "[-5, 4]"]),
        (dict(target=128), ["target", "128", "[0, 127]"]),
        (dict(methods=("attention", "lime")), ["methods", "lime", "occlusion"]),
        (dict(baseline="mean"), ["baseline", "'mean'", "'zero'"]),
        (dict(baseline=500), ["baseline", "500", "[0, 127]"]),
        (dict(baseline=torch.zeros(3, 64)), ["baseline", "(5, 64)", "(3, 64)"]),
        (dict(batch=0), ["batch", "0"]),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError) as err:
            explain(model, ids, **kwargs)
        for word in words:
            assert word in str(err.value), (kwargs, word, str(err.value))
    with pytest.raises(ValueError, match="input_ids must be"):
        explain(model, torch.zeros(0, dtype=torch.long))
    sdpa = tiny("llama")
    sdpa.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="LlamaForCausalLM returned no attention weights.*eager"):
        explain(sdpa, ids, methods=("attention",))
    explain(sdpa, ids, methods=("gradient",))  # the attributions need no weights


# -- the CLI -----------------------------------------------------------------------------------------------


def test_cli_on_a_tiny_saved_llama_writes_table_json_and_png(tmp_path, capsys):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "tiny")  # vocabulary 128, no tokenizer: ASCII prompts as byte ids
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["attribution", "--model", str(tmp_path / "tiny"), "--task", "fewshot", "--examples", "2",
                              "--length", "60", "--steps", "4", "--out", str(tmp_path / "a.json")])
    assert args.func(args) == 0
    assert "Kendall tau" in capsys.readouterr().out
    result = json.loads((tmp_path / "a.json").read_text())
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert len(result["examples"]) == 2 and result["model_class"] == "LlamaForCausalLM"
    assert set(result["summary"]) == {f"{a}|{b}" for i, a in enumerate(METHODS) for b in METHODS[i + 1:]}
    assert result["summary"]["attention|rollout"]["kendall_tau"]["n"] == 2
    bad = parser.parse_args(["attribution", "--model", str(tmp_path / "tiny"), "--examples", "0"])
    with pytest.raises(ValueError, match="--examples must be an integer >= 1, got 0"):
        bad.func(bad)
    bad = parser.parse_args(["attribution", "--model", str(tmp_path), "--examples", "1"])
    with pytest.raises(ValueError, match="no config.json"):
        bad.func(bad)
