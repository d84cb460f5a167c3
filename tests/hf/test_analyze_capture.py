"""attnkit analyze's shared core: capture changes no logits, its weights are eager's (issue 25)."""

import pytest
import torch

from hf_models import padded_inputs, tiny

pytest.importorskip("attnkit.hf")
from attnkit.analysis.hf import attention_weights, capture  # noqa: E402
from attnkit.analysis.hf.capture import LayerCall  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _ids(T=14, B=2, seed=0):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "phi3"])
@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_capture_changes_no_logits(arch, base):
    model = tiny(arch)
    model.set_attn_implementation(base)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        seen = []
        with capture(model, lambda call: seen.append((call.layer, call.weights().sum().item()))):
            got = model(ids).logits
    assert torch.equal(ref, got)
    assert [layer for layer, _ in seen] == [0, 1]
    assert model.config._attn_implementation == base  # restored


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_capture_changes_no_logits_with_padding_and_decoding(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with capture(model, lambda call: call.weights().sum() and None):
            got = model(ids, attention_mask=mask).logits
            # one decoding step with a cache: T = 1 query over S keys
            out = model(ids, attention_mask=mask, use_cache=True)
            step = model(ref[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                         attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1)).logits
        out = model(ids, attention_mask=mask, use_cache=True)
        ref_step = model(ref[:, -1:].argmax(-1), past_key_values=out.past_key_values,
                         attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1)).logits
    assert torch.equal(ref, got)
    assert torch.equal(ref_step, step)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "phi3"])
def test_weights_equal_eager_output_attentions(arch):
    model = tiny(arch)  # sdpa: the fused path
    eager = tiny(arch)
    eager.set_attn_implementation("eager")
    ids = _ids(T=12)
    with torch.no_grad():
        ref = eager(ids, output_attentions=True).attentions
    got = attention_weights(model, ids)
    for layer, w in got.items():
        assert w.shape == ref[layer].shape  # [B, Hq, T, T]: GQA expanded to the query heads
        torch.testing.assert_close(w, ref[layer], atol=1e-6, rtol=1e-5)
    only = attention_weights(model, ids, layers=[1], heads=[3])
    assert list(only) == [1]
    torch.testing.assert_close(only[1], ref[1][:, 3:4], atol=1e-6, rtol=1e-5)


def test_output_is_the_o_proj_input_and_attend_reproduces_it():
    model = tiny("llama")
    ids = _ids()
    o_in, calls = {}, {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_in.__setitem__(i, a[0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad(), capture(model, lambda call: calls.__setitem__(call.layer, call)):
        model(ids)
    for h in hooks:
        h.remove()
    for layer, call in calls.items():
        B, T, H, D = call.output.shape
        assert torch.equal(call.output.reshape(B, T, H * D), o_in[layer])
        torch.testing.assert_close(call.attend(call.weights()), call.output, atol=1e-5, rtol=1e-5)


def test_subject_capture_is_bit_identical_and_matches_eager():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    path = default_subject()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([list(b"def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n")])
    with torch.no_grad():
        ref = model(ids).logits
        kept = {}
        with capture(model, lambda call: kept.__setitem__(call.layer, call.weights())):
            got = model(ids).logits
        eager_w = eager(ids, output_attentions=True).attentions
    assert torch.equal(ref, got)
    assert len(kept) == 12 and kept[0].shape == (1, 4, ids.shape[1], ids.shape[1])  # GQA: 4 query, 2 KV heads
    for layer, w in kept.items():
        torch.testing.assert_close(w, eager_w[layer], atol=1e-6, rtol=1e-5)


def test_a_hook_can_replace_head_outputs():
    model = tiny("llama")
    ids = _ids()

    def zero_head(call):
        out = call.output.clone()
        out[:, :, 2] = 0
        return out

    with torch.no_grad():
        ref = model(ids).logits
        with capture(model, zero_head, layers=[0]):
            got = model(ids).logits
    assert not torch.allclose(ref, got)


def test_bad_input():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"layers must be an integer in \[0, 2\).*got 5"):
        capture(model, lambda call: None, layers=[5])
    with pytest.raises(ValueError, match="layers must not be empty"):
        capture(model, lambda call: None, layers=[])
    with pytest.raises(ValueError, match="hook must be callable"):
        capture(model, None)
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel"):
        capture(torch.nn.Linear(2, 2), lambda call: None)
    with pytest.raises(ValueError, match=r"heads must hold integers in \[0, 4\).*got 7"):
        attention_weights(model, _ids(), heads=[7])
    with pytest.raises(ValueError, match="heads must not be empty"):
        attention_weights(model, _ids(), heads=[])
    with pytest.raises(ValueError, match=r"a capture hook must return None or head outputs"):
        with capture(model, lambda call: torch.zeros(1)), torch.no_grad():
            model(_ids())
    assert model.config._attn_implementation == "sdpa"  # restored after the error
    with capture(model, lambda call: None):
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture(model, lambda call: None):
                pass


def test_refuses_a_model_under_an_attnkit_method():
    import attnkit.hf

    model = tiny("llama")
    with attnkit.hf.apply(model, "streaming", sink=1, window=4):
        with pytest.raises(ValueError, match="runs 'attnkit'.*remove its handle first"):
            with capture(model, lambda call: None):
                pass


def test_layer_call_weights_by_hand():
    # one head, two keys: scores q.k * scaling = [0, log 3] -> softmax [1/4, 3/4] for the second query
    q = torch.tensor([[[[0.0], [1.0]]]])  # (1, 1, 2, 1)
    k = torch.tensor([[[[0.0], [float(torch.log(torch.tensor(3.0)))]]]])
    v = torch.tensor([[[[2.0], [6.0]]]])
    call = LayerCall(0, None, q, k, v, None, 1.0, torch.zeros(1, 2, 1, 1))
    w = call.weights()
    torch.testing.assert_close(w[0, 0], torch.tensor([[1.0, 0.0], [0.25, 0.75]]))
    torch.testing.assert_close(call.attend(w)[0, :, 0, 0], torch.tensor([2.0, 0.25 * 2 + 0.75 * 6]))
    with pytest.raises(ValueError, match="head must hold integers in \\[0, 1\\)"):
        call.scores(1)
