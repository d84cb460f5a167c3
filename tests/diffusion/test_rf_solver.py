"""RF-Solver (arXiv 2411.04746): convergence orders on ODEs with closed-form solutions, inversion
then reconstruction, the update against the official code's written out, the schedule against
FLUX's, the callback hooks and NFE counts, and bad input. All in float64 on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnkit.diffusion.rf_solver import (STAGES, GaussianFlow, Solution, euler, flux_shift, invert, rf_solver,
                                         sample, time_shift, timesteps)

STEPS = (16, 32, 64, 128, 256)


def fitted_order(errors, steps=STEPS) -> float:
    """The slope of log(error) against log(step size) (step size ~ 1 / steps)."""
    return float(np.polyfit(np.log(1.0 / np.asarray(steps, dtype=float)), np.log(errors), 1)[0])


# ODEs with closed-form solutions: name -> (velocity, exact(x, t0, t1), start values, directions)
ODES = {
    # linear with a time-dependent coefficient: x(t1) = x(t0) exp(-(t1^2 - t0^2))
    "linear dx/dt = -2t x": (lambda x, t: -2 * t * x, lambda x, t0, t1: x * math.exp(-(t1 ** 2 - t0 ** 2)),
                             ((1.0, 0.0), (0.0, 1.0))),
    # nonlinear: x(t1) = 1 / (1/x(t0) - (t1 - t0)), finite for x > 0 going from t = 1 to t = 0
    "riccati dx/dt = x^2": (lambda x, t: x * x, lambda x, t0, t1: 1 / (1 / x - (t1 - t0)), ((1.0, 0.0),)),
}


def errors(velocity, exact, x, t0, t1, order, steps=STEPS):
    out = []
    for n in steps:
        ts = torch.linspace(t0, t1, n + 1, dtype=torch.float64)
        got = rf_solver(velocity, x, ts, order=order).x
        out.append((got - exact(x, t0, t1)).abs().max().item())
    return out


@pytest.mark.parametrize("name", sorted(ODES))
def test_euler_is_first_order_and_rf_solver_second_order(name):
    velocity, exact, directions = ODES[name]
    x = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    for t0, t1 in directions:
        e1 = errors(velocity, exact, x, t0, t1, order=1)
        e2 = errors(velocity, exact, x, t0, t1, order=2)
        assert 0.85 < fitted_order(e1) < 1.15, (name, t0, t1, e1)
        assert 1.8 < fitted_order(e2) < 2.2, (name, t0, t1, e2)
        assert all(rf < eu for eu, rf in zip(e1, e2))


def test_gaussian_flow_reference_and_rf_solver_gains_an_order_on_it():
    flow = GaussianFlow(mean=2.0, std=0.3)
    x = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # the closed form solves the ODE: its time derivative (central difference) is the velocity
    for t in (0.05, 0.5, 0.95):
        d = (flow.flow(x, 0.3, t + 1e-5) - flow.flow(x, 0.3, t - 1e-5)) / 2e-5
        torch.testing.assert_close(d, flow.velocity(flow.flow(x, 0.3, t), t), rtol=1e-7, atol=1e-7)
    # noise -> data maps N(0, 1) onto N(mean, std^2): x0 = mean + std * noise
    torch.testing.assert_close(flow.flow(x, 1.0, 0.0), 2.0 + 0.3 * x, rtol=0, atol=1e-12)
    exact = flow.flow
    e1 = errors(flow.velocity, exact, x, 1.0, 0.0, order=1)
    e2 = errors(flow.velocity, exact, x, 1.0, 0.0, order=2)
    assert 0.85 < fitted_order(e1) < 1.15, e1
    # on a Gaussian-to-Gaussian flow the midpoint rule's h^3 local error term vanishes identically
    # (x(t) = m(t) + s(t) z with m linear and s^2 quadratic in t; checked symbolically), so the
    # global error falls as h^3: a looser "second order or better" would hide a wrong midpoint time
    assert 2.8 < fitted_order(e2) < 3.2, e2


def test_one_step_is_the_official_update_written_out():
    flow = GaussianFlow(mean=torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), std=0.4)
    x = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64)
    t, t_next = 0.8, 0.55
    h = t_next - t
    v = flow.velocity(x, t)
    x_mid = x + h / 2 * v
    v_mid = flow.velocity(x_mid, t + h / 2)
    first_order = (v_mid - v) / (h / 2)
    expected = x + h * v + 0.5 * h ** 2 * first_order
    got = rf_solver(flow.velocity, x, [t, t_next])
    torch.testing.assert_close(got.x, expected, rtol=0, atol=1e-15)
    assert got.nfe == 2
    # the midpoint form is its algebraic equal; order 1 is Euler
    torch.testing.assert_close(rf_solver(flow.velocity, x, [t, t_next], form="midpoint").x, x + h * v_mid,
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(euler(flow.velocity, x, [t, t_next]).x, x + h * v, rtol=0, atol=0)


def test_forms_agree_over_a_schedule():
    flow = GaussianFlow(mean=1.5, std=0.5)
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ts = timesteps(12, image_seq_len=1024)
    torch.testing.assert_close(rf_solver(flow.velocity, x, ts).x, rf_solver(flow.velocity, x, ts, form="midpoint").x,
                               rtol=1e-12, atol=1e-12)


def test_invert_then_sample_reconstructs_better_than_euler_at_equal_nfe():
    flow = GaussianFlow(mean=torch.linspace(-1.0, 2.0, 32, dtype=torch.float64), std=0.3)
    g = torch.Generator().manual_seed(1)
    x0 = flow.mean + 0.3 * torch.randn(4, 32, dtype=torch.float64, generator=g)  # rows drawn from the data
    for n, shift in ((10, None), (10, 3.0), (25, None)):
        noise, nfe_inv = invert(flow.velocity, x0, n, shift=shift)
        back, nfe_smp = sample(flow.velocity, noise, n, shift=shift)
        assert nfe_inv == nfe_smp == 2 * n
        noise_e, nfe_e = invert(flow.velocity, x0, 2 * n, shift=shift, order=1)
        back_e, _ = sample(flow.velocity, noise_e, 2 * n, shift=shift, order=1)
        assert nfe_e == 2 * n
        rf_err = (back - x0).abs().max().item()
        euler_err = (back_e - x0).abs().max().item()
        # measured: 10 steps 145x lower, 10 steps with shift 3 61x, 25 steps 925x
        assert rf_err < euler_err / 20, (n, shift, rf_err, euler_err)
        # and the inverted noise is the exact flow's noise, up to the solver's error
        exact_noise = flow.flow(x0, 0.0, 1.0)
        assert (noise - exact_noise).abs().max() < (noise_e - exact_noise).abs().max() / 20


def test_callback_sees_every_evaluation_in_order_with_its_stage():
    flow = GaussianFlow(mean=1.0, std=0.5)
    calls, seen = [], []

    def velocity(x, t):
        calls.append((t, x.clone()))
        return flow.velocity(x, t)

    def callback(step, t, t_next, x, stage):
        seen.append((step, t, t_next, stage, x.clone()))

    x = torch.tensor([0.2, -0.7], dtype=torch.float64)
    ts = [1.0, 0.6, 0.25, 0.0]
    out = rf_solver(velocity, x, ts, callback=callback)
    assert out.nfe == len(calls) == len(seen) == 6
    assert [(s, st) for s, _, _, st, _ in seen] == [(0, "main"), (0, "midpoint"), (1, "main"), (1, "midpoint"),
                                                     (2, "main"), (2, "midpoint")]
    assert [(t, tn) for _, t, tn, _, _ in seen[::2]] == [(1.0, 0.6), (0.6, 0.25), (0.25, 0.0)]
    for (step, t, t_next, stage, xc), (t_eval, x_eval) in zip(seen, calls):
        # the callback gets the state the velocity is about to see, before it sees it
        assert torch.equal(xc, x_eval)
        assert t_eval == pytest.approx(t if stage == "main" else (t + t_next) / 2, abs=1e-15)
    assert {st for *_, st, _ in seen} == set(STAGES)
    # the midpoint state is the Euler half step from the main state
    h = 0.6 - 1.0
    torch.testing.assert_close(seen[1][4], x + h / 2 * flow.velocity(x, 1.0), rtol=0, atol=1e-15)

    seen.clear()
    calls.clear()
    out = euler(velocity, x, ts, callback=callback)
    assert out.nfe == len(calls) == 3
    assert [(s, st) for s, _, _, st, _ in seen] == [(0, "main"), (1, "main"), (2, "main")]


def test_inversion_and_sampling_steps_pair_by_interval():
    flow = GaussianFlow()
    keys = {"invert": [], "sample": []}

    def recorder(name):
        return lambda step, t, t_next, x, stage: keys[name].append((step, max(t, t_next), stage, t_next > t))

    x = torch.zeros(3, dtype=torch.float64)
    n = 5
    invert(flow.velocity, x, n, image_seq_len=4096, callback=recorder("invert"))
    sample(flow.velocity, x, n, image_seq_len=4096, callback=recorder("sample"))
    inv, smp = keys["invert"], keys["sample"]
    assert all(up for *_, up in inv) and not any(up for *_, up in smp)
    # inversion step i covers sampling step n - 1 - i, and (max(t, t_next), stage) is the same key
    by_key = {(k, st): s for s, k, st, _ in smp}
    assert {(k, st) for _, k, st, _ in inv} == set(by_key)
    for s, k, st, _ in inv:
        assert by_key[(k, st)] == n - 1 - s


def test_timesteps_and_the_flux_shift():
    ts = timesteps(4)
    assert ts.dtype == torch.float64 and ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # the official get_schedule: mu linear through (256, 0.5) and (4096, 1.15), t -> e^mu / (e^mu + 1/t - 1)
    for seq in (256, 1024, 4096):
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
        grid = torch.linspace(1, 0, 29, dtype=torch.float64)
        official = [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in grid.tolist()]
        torch.testing.assert_close(timesteps(28, image_seq_len=seq), torch.tensor(official, dtype=torch.float64),
                                   rtol=0, atol=1e-14)
        assert flux_shift(seq) == pytest.approx(math.exp(mu), rel=1e-14)
    shifted = timesteps(10, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and bool((shifted.diff() < 0).all())
    assert bool((shifted[1:-1] > timesteps(10)[1:-1]).all())  # shift > 1 spends more steps near noise
    torch.testing.assert_close(time_shift(timesteps(10), 1.0), timesteps(10), rtol=0, atol=0)


def test_schedule_matches_diffusers_flux_scheduler():
    diffusers = pytest.importorskip("diffusers")
    n, seq = 8, 1024
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096)
    mu = math.log(flux_shift(seq))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # what FluxPipeline passes
    torch.testing.assert_close(sched.sigmas.double(), timesteps(n, image_seq_len=seq), rtol=0, atol=1e-6)


def test_times_as_tensor_array_or_list_agree():
    flow = GaussianFlow(mean=0.5, std=0.7)
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    grid = [1.0, 0.7, 0.3, 0.0]
    ref = rf_solver(flow.velocity, x, grid).x
    for ts in (torch.tensor(grid, dtype=torch.float64), np.asarray(grid), tuple(grid)):
        torch.testing.assert_close(rf_solver(flow.velocity, x, ts).x, ref, rtol=0, atol=1e-15)


def test_dtype_and_shape_are_kept():
    flow = GaussianFlow(mean=0.5, std=0.7)
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))  # float32, FLUX-like [B, N, C]
    out = sample(flow.velocity, x, 6)
    assert isinstance(out, Solution) and out.x.dtype == torch.float32 and out.x.shape == x.shape
    ref = sample(flow.velocity, x.double(), 6).x
    torch.testing.assert_close(out.x.double(), ref, rtol=1e-5, atol=1e-5)


BAD = [
    (lambda: timesteps(0), "steps must be a positive integer, got 0"),
    (lambda: timesteps(2.5), "steps must be a positive integer, got 2.5"),
    (lambda: timesteps(True), "steps must be a positive integer, got True"),
    (lambda: timesteps(4, shift=0.0), r"shift must be a finite number > 0 .*got 0.0"),
    (lambda: timesteps(4, shift=float("nan")), "shift must be a finite number > 0"),
    (lambda: timesteps(4, shift=2.0, image_seq_len=1024), "give shift .* or image_seq_len .*, not both"),
    (lambda: timesteps(4, max_shift=2.0), r"\['max_shift'\] set FLUX's shift and go with image_seq_len"),
    (lambda: flux_shift(0), "image_seq_len must be a positive integer .*got 0"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0]), "at least 2 times .*got 1"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), []), "at least 2 times .*got 0"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, 0.5, 0.7, 0.0]), "strictly monotonic"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, 1.0, 0.0]), "strictly monotonic"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.5, 0.5, 0.0]), r"ts must lie in \[0, 1\].*1.5"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, -0.1]), r"ts must lie in \[0, 1\].*-0.1"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, float("nan")]), r"ts must lie in \[0, 1\]"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), torch.ones(2, 2)), "ts must be 1-D .*shape \\(2, 2\\)"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), "10"), "ts must be a 1-D tensor or a sequence"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), np.ones((2, 2))), "ts must be 1-D"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, "a"]), "ts must hold numbers"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, 0.0], order=3), "order must be 1 .* or 2 .*got 3"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, 0.0], order=True), "order must be 1"),
    (lambda: rf_solver(GaussianFlow().velocity, [0.0, 1.0], [1.0, 0.0]), "x must be a torch.Tensor, got list"),
    (lambda: rf_solver(None, torch.zeros(2), [1.0, 0.0]), "velocity must be callable .*got NoneType"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, 0.0], callback=3), "callback must be callable"),
    (lambda: rf_solver(GaussianFlow().velocity, torch.zeros(2), [1.0, 0.0], form="heun"), "form must be 'taylor'"),
    (lambda: rf_solver(lambda x, t: x[:1], torch.zeros(2), [1.0, 0.0]),
     r"velocity\(x, t=1\) returned \(1,\); it must return a tensor shaped as x, \(2,\)"),
    (lambda: rf_solver(lambda x, t: 0.0, torch.zeros(2), [1.0, 0.0]), r"returned float; it must return a tensor"),
    (lambda: sample(GaussianFlow().velocity, torch.zeros(2), ts=[0.0, 1.0]), "sample runs from noise to data"),
    (lambda: invert(GaussianFlow().velocity, torch.zeros(2), ts=[1.0, 0.0]), "invert runs from data to noise"),
    (lambda: sample(GaussianFlow().velocity, torch.zeros(2)), "give steps .* or ts"),
    (lambda: sample(GaussianFlow().velocity, torch.zeros(2), 4, ts=[1.0, 0.0]), "give ts, or steps"),
    (lambda: GaussianFlow(std=0.0), "std must be finite and > 0"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_raises_a_clear_value_error(case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        call()


# -- the diffusers scheduler ---------------------------------------------------------------------------


def tiny_flux_pipeline(scheduler):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    vae = diffusers.AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                                  layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
                                  use_post_quant_conv=False)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_scheduler_in_a_flux_pipeline_equals_rf_solver_on_the_transformer():
    diffusers = pytest.importorskip("diffusers")
    from attnkit.diffusion.rf_solver import RFSolverScheduler

    flux_config = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0).config
    pipe = tiny_flux_pipeline(RFSolverScheduler.from_config(flux_config))
    g = torch.Generator().manual_seed(0)
    prompt, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    latents = torch.randn(2, 256, 4, generator=g)  # packed: 16 x 16 tokens of 1 x 2 x 2 channels
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((float(kw["timestep"][0]), pipe.scheduler.solver_step, pipe.scheduler.stage)),
        with_kwargs=True)
    out = pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, latents=latents, num_inference_steps=4, height=32,
               width=32, output_type="latent").images
    hook.remove()

    img_ids = pipe._prepare_latent_image_ids(2, 16, 16, "cpu", torch.float32)

    def velocity(x, t):
        with torch.no_grad():
            return pipe.transformer(hidden_states=x, timestep=torch.full((x.shape[0],), t), pooled_projections=pooled,
                                    encoder_hidden_states=prompt, txt_ids=torch.zeros(8, 3), img_ids=img_ids,
                                    return_dict=False)[0]

    ts = timesteps(4, image_seq_len=256)
    ref = sample(velocity, latents, ts=ts)
    assert len(seen) == ref.nfe == 8
    torch.testing.assert_close(out, ref.x, rtol=1e-5, atol=1e-5)
    expected_t = [t for a, b in zip(ts[:-1].tolist(), ts[1:].tolist()) for t in (a, (a + b) / 2)]
    assert [t for t, _, _ in seen] == pytest.approx(expected_t, abs=1e-6)
    assert [(s, st) for _, s, st in seen] == [(i, st) for i in range(4) for st in STAGES]


def test_scheduler_bad_use():
    pytest.importorskip("diffusers")
    from attnkit.diffusion.rf_solver import RFSolverScheduler

    with pytest.raises(ValueError, match="stochastic_sampling=True"):
        RFSolverScheduler(stochastic_sampling=True).set_timesteps(3)
    sched = RFSolverScheduler()
    sched.set_timesteps(1)
    x = torch.zeros(2, 3)
    for t in sched.timesteps:
        x = sched.step(torch.ones(2, 3), t, x, return_dict=False)[0]
    torch.testing.assert_close(x, torch.full((2, 3), -1.0))  # v = 1 from t = 1 to 0
    with pytest.raises(ValueError, match="step\\(\\) was called 3 times for 2 timesteps"):
        sched.step(torch.ones(2, 3), sched.timesteps[-1], x)
