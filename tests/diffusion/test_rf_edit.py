"""RF-Edit on a tiny FLUX transformer with attnkit.diffusion.rf_solver: the pairing of inversion and
sampling steps, the attention with the inversion's values against a float64 computation, switch-off."""

from __future__ import annotations

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from attnkit.diffusion import rf_solver  # noqa: E402

from test_sharing import flux, flux_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
STEPS = 3


def _velocity(model, text):
    base = flux_inputs(batch=2)

    def velocity(x, t):
        kw = {**base, "hidden_states": x, "encoder_hidden_states": text, "timestep": torch.full((2,), t, dtype=x.dtype)}
        return model(**kw)[0]

    return velocity


def _edit_run(model, method):
    base = flux_inputs(batch=2)
    source, target = base["encoder_hidden_states"], base["encoder_hidden_states"].flip(0)
    x0 = base["hidden_states"]
    with torch.no_grad(), ad.apply(model, method) as handle:
        cb = method.callback if isinstance(method, ad.RFEdit) else None
        noise = rf_solver.invert(_velocity(model, source), x0, STEPS, callback=cb).x
        handle.reset()
        out = rf_solver.sample(_velocity(model, target), noise, STEPS, callback=cb).x
    return noise, out


class Spy(ad.RFEdit):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.log = []

    def attend(self, call):
        out = super().attend(call)
        self.log.append((self._inverse, self._key, call.site.name, call.q, call.k, call.v, out))
        return out


def test_inject_zero_is_the_stock_edit_bit_for_bit():
    model = flux()
    stock = _edit_run(model, ad.Sharing(steps=()))
    edit = ad.RFEdit(inject=0, single_from=0).schedule(STEPS)
    got = _edit_run(model, edit)
    assert all(torch.equal(a, b) for a, b in zip(stock, got)) and len(edit.bank) == 0


def test_the_sampling_steps_attend_with_the_inversions_values():
    model = flux()
    edit = Spy(inject=2, single_from=0).schedule(STEPS)
    noise, out = _edit_run(model, edit)
    stock_noise, stock_out = _edit_run(model, ad.Sharing(steps=()))
    torch.testing.assert_close(noise, stock_noise, rtol=0, atol=0)  # recording does not change the inversion
    assert not torch.allclose(out, stock_out)
    inv = {(key, name): v for inverse, key, name, q, k, v, o in edit.log if inverse}
    smp = [(key, name, q, k, o) for inverse, key, name, q, k, v, o in edit.log if not inverse]
    # the last 2 inversion steps x 2 stages record, the first 2 sampling steps x 2 stages read (one single block)
    assert len(inv) == 4 and len(smp) == 4 and {n for _, n in inv} == {"single_transformer_blocks.0.attn"}
    assert {k for k, _ in inv} == {k for k, _, _, _, _ in smp}  # every read has its recorded pair
    for key, name, q, k, o in smp:
        v = inv[key, name]
        p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        torch.testing.assert_close(o, p @ v, rtol=1e-12, atol=1e-12)
    # the pairs: inversion step from t_a to t_b with sampling from t_b to t_a (keys: the later time)
    times = rf_solver.timesteps(STEPS).tolist()
    assert {k[0] for k, _ in inv} == {round(t * 10**9) for t in times[:2]}


def test_bad_input_and_a_missing_schedule_are_clear():
    model = flux()
    for kwargs, match in ((dict(inject=-1), "inject must be an integer >= 0"),
                          (dict(single_from=None), "give single_from"),
                          (dict(bank={}), "bank must be an attnkit.diffusion.KVBank")):
        with pytest.raises(ValueError, match=match):
            ad.RFEdit(**kwargs)
    with pytest.raises(ValueError, match="single_from=5 leaves no single-stream block"):
        ad.apply(model, "rf-edit", single_from=5)
    edit = ad.RFEdit(inject=1, single_from=0)
    with pytest.raises(ValueError, match=r"call edit.schedule\(steps\)"):
        edit.callback(0, 1.0, 0.5, None, "main")
    edit.schedule(STEPS)
    with torch.no_grad(), ad.apply(model, edit):
        edit.callback(0, 1.0, 0.5, None, "main")  # a sampling step whose inversion never ran
        with pytest.raises(ValueError, match="KVBank holds nothing for module"):
            model(**flux_inputs(batch=2))
