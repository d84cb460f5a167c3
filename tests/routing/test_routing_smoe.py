"""attnkit.routing.smoe: each router's fast path against its plain float64 reference (forward and every
gradient), exact top-k dispatch, the load-balancing loss on known cases, causality of the token graph,
and the ValueErrors."""

import pytest
import torch

from attnkit.routing import (AttentionAwareRouter, AttentionInputs, RoutedBlock, SimilarityAwareRouter, SparseMoE,
                             TopKRouter, balance_loss, select_top_k)
from attnkit.routing.smoe import Routing

B, T, C, E = 2, 9, 16, 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops: on a loaded 2-core machine every OpenMP region of a 2-thread run waits ~10 ms for its second
    thread (the whole file took 100x longer), so these tests run on one thread and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rel(ref, out):
    return float((ref - out).norm() / ref.norm().clamp_min(1e-30))


def _attention(seed=3, heads=4, kv_heads=2, head_dim=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, T, head_dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, kv_heads, T, head_dim, generator=g, dtype=dtype, requires_grad=True)
    return q, k


CASES = [
    ("topk", {}, 2),
    ("topk", {}, 1),
    ("similarity", {}, 2),
    ("similarity", {"causal": False, "temperature": 0.5}, 2),
    ("similarity", {"similarity": "learned", "similarity_dim": 5}, 1),
    ("similarity", {"similarity": "learned", "causal": False, "normalize": False}, 3),
    ("attention", {}, 2),
    ("attention", {}, 1),
]


CASES += [("attention", {"form": "probabilities"}, 2)]  # the materialised attention instead of q, k


@pytest.mark.parametrize("router,options,top_k", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fast_path_matches_reference_forward_and_grads(router, options, top_k):
    options = dict(options)
    attention_form = options.pop("form", "inputs")
    torch.manual_seed(0)
    moe = SparseMoE(C, E, top_k, hidden=12, router=router, **options).double()
    with torch.no_grad():  # router logits large enough that the graph routers' mixing is far from uniform
        moe.router.gate.weight.mul_(8.0)
    x = torch.randn(B, T, C, dtype=torch.float64, requires_grad=True)
    attention, leaves = None, []
    if router == "attention":
        q, k = _attention()
        leaves = [q, k]
        attention = AttentionInputs(q, k, "causal")
        if attention_form == "probabilities":
            attention = attention.probabilities()
    # the graph routers really mix: their distribution is not each token's own
    probs = moe.router.distribution(x, attention)
    own = moe.router.own_distribution(x)
    assert (router == "topk") == bool(torch.allclose(probs, own))
    cotangent = torch.randn(B, T, C, dtype=torch.float64)
    outs, grads = [], []
    for fn in (moe, moe.reference):
        out = fn(x, attention)
        wrt = [x, *leaves, *moe.parameters()]
        grads.append(torch.autograd.grad((out * cotangent).sum(), wrt, allow_unused=True, retain_graph=True))
        outs.append(out)
    assert _rel(outs[1], outs[0]) < 1e-12
    names = ["x", *(["q", "k"] if leaves else []), *(n for n, _ in moe.named_parameters())]
    for name, fast, ref in zip(names, *grads):
        if ref is None:
            assert fast is None or fast.abs().max() == 0, name
            continue
        assert fast is not None and ref.abs().max() > 0, name
        assert _rel(ref, fast) < 1e-10, name


def test_dispatch_each_token_is_the_weighted_sum_of_its_experts():
    torch.manual_seed(1)
    moe = SparseMoE(C, E, 3, hidden=10, router="topk")
    x = torch.randn(B, T, C)
    y = moe(x)
    routing = moe.last_routing
    for b in range(B):
        for t in range(T):
            chosen = routing.experts[b, t].tolist()
            assert len(set(chosen)) == 3
            probs = routing.probs[b, t]
            assert all(probs[e] >= probs.max() - 1e-7 or e != chosen[0] for e in chosen)  # best first
            gates = probs[chosen] / probs[chosen].sum()  # renormalised over the chosen three
            expected = sum(gates[i] * moe.experts.one(e, x[b, t][None])[0] for i, e in enumerate(chosen))
            torch.testing.assert_close(y[b, t], expected, rtol=1e-5, atol=1e-6)
    # experts not chosen have no effect: changing an unchosen expert leaves the output alone
    unused = sorted(set(range(E)) - set(routing.experts[0, 0].tolist()))[0]
    x0 = x[:1, :1]
    before = moe(x0)
    with torch.no_grad():
        moe.experts.w_out[unused].add_(1.0)
    torch.testing.assert_close(moe(x0), before)


def test_top_one_gate_is_the_probability_so_the_router_learns():
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    routing = select_top_k(probs, 1)
    assert routing.experts.tolist() == [[1]] and torch.allclose(routing.weights, torch.tensor([[0.6]]))
    two = select_top_k(probs, 2)
    assert two.experts.tolist() == [[1, 2]] and torch.allclose(two.weights, torch.tensor([[2 / 3, 1 / 3]]))
    assert torch.allclose(select_top_k(probs, 2, normalize=False).weights, torch.tensor([[0.6, 0.3]]))


def test_balance_loss_known_values():
    n = 12
    uniform = torch.full((n, 4), 0.25)
    experts = torch.arange(n).remainder(4)[:, None]  # every expert gets n / 4 slots
    assert float(balance_loss(Routing(uniform, experts, uniform[:, :1]), 4)) == pytest.approx(1.0)
    collapsed = torch.zeros(n, 4)
    collapsed[:, 2] = 1.0
    one = torch.full((n, 1), 2)
    assert float(balance_loss(Routing(collapsed, one, collapsed[:, :1]), 4)) == pytest.approx(4.0)
    # differentiable through the probabilities, and the layer leaves it after a forward
    moe = SparseMoE(C, E, 2)
    moe(torch.randn(B, T, C))
    moe.aux_loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_identity_attention_gives_the_baseline_distribution():
    torch.manual_seed(2)
    router = AttentionAwareRouter(C, E, 2)
    baseline = TopKRouter(C, E, 2)
    baseline.load_state_dict(router.state_dict())
    x = torch.randn(B, T, C)
    eye = torch.eye(T).expand(B, 3, T, T)
    torch.testing.assert_close(router.distribution(x, eye), baseline.distribution(x))
    # uniform causal attention averages the prefix: token t's distribution is the mean of tokens 0..t
    causal = torch.tril(torch.ones(T, T))
    uniform = (causal / causal.sum(-1, keepdim=True)).expand(B, T, T)
    own = baseline.distribution(x)
    expected = own.cumsum(1) / torch.arange(1, T + 1)[None, :, None]
    torch.testing.assert_close(router.distribution(x, uniform), expected)


def test_similarity_graph_is_causal_unless_asked_otherwise():
    torch.manual_seed(4)
    x = torch.randn(1, T, C)
    later = x.clone()
    later[0, -1] += 5.0
    for causal in (True, False):
        router = SimilarityAwareRouter(C, E, 2, causal=causal)
        with torch.no_grad():
            router.gate.weight.mul_(8.0)
        before, after = router.distribution(x), router.distribution(later)
        past_same = torch.allclose(before[0, :-1], after[0, :-1])
        assert past_same == causal
    # identical tokens: every token's neighbours share its distribution, so mixing changes nothing
    same = torch.randn(1, 1, C).expand(2, T, C)
    router = SimilarityAwareRouter(C, E, 2, causal=False)
    torch.testing.assert_close(router.distribution(same), router.own_distribution(same))


def test_block_passes_its_own_attention_to_the_router():
    torch.manual_seed(5)
    block = RoutedBlock(C, 4, E, 2, router="attention").double()
    x = torch.randn(B, T, C, dtype=torch.float64)
    y = block(x)
    h = x + block.attn(block.attn_norm(x))
    inputs = block.attn.last_inputs
    # the captured q, k reproduce the layer's own attention weights
    torch.testing.assert_close(inputs.probabilities(), block.attn.attention_weights(block.attn_norm(x)).double())
    expected = h + block.moe.reference(block.moe_norm(h), inputs)
    torch.testing.assert_close(y, expected)
    assert block.attn.last_inputs is not None and RoutedBlock(C, 4, router="topk").attn.keep_inputs is False


@pytest.mark.parametrize("build,match", [
    (lambda: SparseMoE(C, 4, 5), "top_k=5 exceeds num_experts=4"),
    (lambda: SparseMoE(C, 4, 0), "top_k must be a positive integer"),
    (lambda: SparseMoE(C, 0, 1), "num_experts must be a positive integer"),
    (lambda: SparseMoE(C, 4, 2, hidden=-1), "hidden must be a positive integer"),
    (lambda: SparseMoE(C, 4, 2, router="hash"), "unknown router 'hash'; accepted: topk, similarity, attention"),
    (lambda: SparseMoE(C, 4, 2, router="topk", temperature=0.5), "router 'topk'.*temperature"),
    (lambda: SparseMoE(C, 4, 2, router=TopKRouter(C, 4, 1)), "the router was built for"),
    (lambda: SimilarityAwareRouter(C, 4, 2, temperature=0.0), "temperature must be a positive finite number"),
    (lambda: SimilarityAwareRouter(C, 4, 2, similarity="cosine"), "unknown similarity 'cosine'"),
    (lambda: SimilarityAwareRouter(C, 4, 2, similarity_dim=8), "similarity_dim=8 applies to similarity='learned'"),
    (lambda: SimilarityAwareRouter(C, 4, 2, causal="yes"), "causal must be True or False"),
    (lambda: TopKRouter(C, 4, 2, normalize=1), "normalize must be True or False"),
    (lambda: RoutedBlock(C, 4, pattern="sliding"), "pattern must be 'causal' or 'full'"),
])
def test_bad_options_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_raise():
    moe = SparseMoE(C, 4, 2, router="attention")
    x = torch.randn(B, T, C)
    with pytest.raises(ValueError, match="needs attention"):
        moe(x)
    with pytest.raises(ValueError, match=r"must be \[B, H, T, T\] or \[B, T, T\]"):
        moe(x, torch.rand(B, 2, T, T + 1))
    q, k = torch.randn(B, 4, T + 1, 8), torch.randn(B, 2, T + 1, 8)
    with pytest.raises(ValueError, match=r"must be \[B, H, T, D\]"):
        moe(x, AttentionInputs(q, k))
    with pytest.raises(ValueError, match="AttentionInputs or a tensor"):
        moe(x, [q, k])
    with pytest.raises(ValueError, match="x has width C=8"):
        moe(torch.randn(B, T, 8))
    with pytest.raises(ValueError, match=r"shape \[B, T, C\]"):
        moe(torch.randn(T, C))
