"""RF-Solver: a second-order solver of the rectified-flow ODE, for sampling and for inversion.

Wang et al., "Taming Rectified Flow for Inversion and Editing", arXiv 2411.04746 (ICML 2025);
official code github.com/wangjiangshan0725/RF-Solver-Edit, ``FLUX_Image_Edit/src/flux/sampling.py``
(``get_schedule`` and ``denoise``).

Convention (FLUX, SD3, diffusers' ``FlowMatchEulerDiscreteScheduler``): time ``t`` runs from 1
(noise) to 0 (data), ``x_t = (1 - t) x0 + t noise``, and a model predicts the velocity
``v(x, t) = dx/dt`` (``noise - x0`` on a straight path). Sampling integrates ``dx/dt = v(x, t)``
from t = 1 down to t = 0; inversion integrates the same ODE from t = 0 up to t = 1.

The update. Over one step from ``t`` to ``t_next`` (``h = t_next - t``, negative when sampling),
the exact solution is ``x(t_next) = x(t) + integral_t^t_next v(x(tau), tau) dtau``. RF-Solver
expands the velocity along the trajectory to first order, ``v(tau) = v(t) + (tau - t) v'(t)``, and
integrates it:

    x_next = x + h v(x, t) + h^2 / 2 * v'(x, t)

where ``v'`` is the total derivative of v along the trajectory, estimated by a forward difference
over half a step, with the midpoint state taken by an Euler half step:

    x_mid = x + h / 2 * v(x, t)
    v'    = (v(x_mid, t + h / 2) - v(x, t)) / (h / 2)

This is the official code's ``denoise`` line for line (``img_mid``, ``pred_mid``,
``first_order``). Two model evaluations (NFE) per step; ``order=1`` keeps only the first term
(plain Euler, one NFE per step). Algebraically the update equals ``x + h v(x_mid, t + h / 2)``,
the explicit midpoint rule (second-order Runge-Kutta); ``form="midpoint"`` computes it that way
(same result up to rounding, one fewer subtraction and division).

Where the official code and this module differ: nowhere in the update. The schedule follows
the code's ``get_schedule`` (uniform in t, then FLUX's resolution-dependent time shift:
``timesteps(steps, image_seq_len=...)``); ``timesteps(steps)`` without a shift is the unshifted
grid (the code's ``shift=False``, used for FLUX-schnell).

Hooks for attention sharing (RF-Edit). ``callback(step, t, t_next, x, stage)`` is called just
before every velocity evaluation: ``step`` the step index within this call (0 first), ``t`` /
``t_next`` the step's endpoints (floats), ``x`` the state about to be evaluated, ``stage``
``"main"`` (evaluated at ``(x, t)``) or ``"midpoint"`` (at ``(x_mid, t + h / 2)``). Inversion
over the reversed schedule covers the same intervals in the opposite order: inversion step ``i``
of ``n`` is sampling step ``n - 1 - i``, and ``(max(t, t_next), stage)`` is the same key in both
passes, the key of the official code's value bank (``info['t'] = t_prev if inverse else t_curr``
plus ``info['second_order']``). A pass is an inversion when ``t_next > t``.

In a diffusers pipeline, :class:`RFSolverScheduler` (when diffusers is installed) runs the same
update inside the pipeline's own loop. :class:`GaussianFlow` is a flow with a closed-form
velocity and solution, the reference of the tests, the docs' examples and
``benchmarks/rf_solver_order.py``; on it RF-Solver converges as h^3, not h^2 (the midpoint rule's
h^3 local error term vanishes on Gaussian-to-Gaussian flows), so it flatters the solver.

    >>> import torch
    >>> from attnkit.diffusion.rf_solver import rf_solver, timesteps
    >>> x, nfe = rf_solver(lambda x, t: -x, torch.ones(3), timesteps(4))
    >>> nfe
    8
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["STAGES", "GaussianFlow", "Solution", "euler", "flux_shift", "invert", "rf_solver", "sample", "time_shift",
           "timesteps"]

STAGES = ("main", "midpoint")

Velocity = Callable[[Tensor, float], Tensor]
Callback = Callable[[int, float, float, Tensor, str], object]


class Solution(NamedTuple):
    """What a solve returns: the final state ``x`` (shaped as the input) and ``nfe``, the number of
    velocity evaluations it made (``steps`` for Euler, ``2 * steps`` for RF-Solver-2)."""

    x: Tensor
    nfe: int


# -- the schedule -----------------------------------------------------------------------------------


def flux_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
    """FLUX's time-shift factor for ``image_seq_len`` latent tokens: ``exp(mu)``, where ``mu`` is
    linear in the token count through (``base_seq_len``, ``base_shift``) and (``max_seq_len``,
    ``max_shift``): 0.5 at 256 tokens, 1.15 at 4096 (a 1024 x 1024 image). The official code's
    ``get_lin_function`` and diffusers' ``calculate_shift`` compute the same ``mu``."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len <= 0:
        raise ValueError(f"image_seq_len must be a positive integer (latent tokens), got {image_seq_len!r}")
    if max_seq_len == base_seq_len:
        raise ValueError(f"base_seq_len and max_seq_len must differ, got {base_seq_len} for both")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


def time_shift(t: Tensor, shift: float) -> Tensor:
    """``shift * t / (1 + (shift - 1) * t)``: keeps 0 and 1, spends more of the steps near t = 1
    (noise) when ``shift > 1``. This is SD3's shift and FLUX's ``time_shift(mu, 1, t) =
    e^mu / (e^mu + 1/t - 1)`` with ``shift = e^mu`` (the same function, written without 1/t)."""
    return shift * t / (1 + (shift - 1) * t)


def timesteps(steps: int, shift: float | None = None, *, image_seq_len: int | None = None,
              **flux_shift_options) -> Tensor:
    """The sampling schedule: ``steps + 1`` times from 1 (noise) down to 0 (data), float64 ``[steps + 1]``.

    Uniform in t, then optionally shifted: ``shift`` a factor > 0 (SD3 style, see
    :func:`time_shift`), or ``image_seq_len`` to take FLUX's resolution-dependent factor
    (:func:`flux_shift`; ``flux_shift_options`` go to it), as the official code's
    ``get_schedule`` does for FLUX-dev. Inversion runs the same schedule reversed
    (``timesteps(...).flip(0)``), so both passes visit the same times."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if shift is not None and image_seq_len is not None:
        raise ValueError(f"give shift ({shift!r}) or image_seq_len ({image_seq_len!r}), not both")
    if flux_shift_options and image_seq_len is None:
        raise ValueError(f"{sorted(flux_shift_options)} set FLUX's shift and go with image_seq_len, which is None")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if image_seq_len is not None:
        shift = flux_shift(image_seq_len, **flux_shift_options)
    if shift is not None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"shift must be a finite number > 0 (1 is no shift), got {shift!r}")
        ts = time_shift(ts, float(shift))
    return ts


# -- the solvers -----------------------------------------------------------------------------------


def _times(ts) -> list[float]:
    """``ts`` checked: at least 2 finite times in [0, 1], strictly decreasing or strictly increasing."""
    if not isinstance(ts, Tensor) and hasattr(ts, "__array__") and hasattr(ts, "ndim"):  # a NumPy array
        ts = torch.as_tensor(ts)
    if isinstance(ts, Tensor):
        if ts.dim() != 1:
            raise ValueError(f"ts must be 1-D (the times, endpoints included), got a tensor of shape {tuple(ts.shape)}")
        values = ts.detach().to("cpu", torch.float64).tolist()
    elif isinstance(ts, Sequence) and not isinstance(ts, str):
        try:
            values = [float(t) for t in ts]
        except (TypeError, ValueError):
            raise ValueError(f"ts must hold numbers, got {list(ts)!r}") from None
    else:
        raise ValueError(f"ts must be a 1-D tensor or a sequence of times, got {type(ts).__name__}")
    if len(values) < 2:
        raise ValueError(f"ts needs at least 2 times (steps >= 1), got {len(values)}: {values}")
    bad = [t for t in values if not (math.isfinite(t) and 0.0 <= t <= 1.0)]
    if bad:
        raise ValueError(f"ts must lie in [0, 1] (t = 1 noise, t = 0 data), got {bad[:4]} in {values[:8]}")
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    if not (all(h < 0 for h in steps) or all(h > 0 for h in steps)):
        raise ValueError("ts must be strictly monotonic: decreasing to sample (1 -> 0), increasing to invert "
                         f"(0 -> 1); got {values[:8]}{' ...' if len(values) > 8 else ''}")
    return values


def _check(velocity, x, callback, order) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not callable(velocity):
        raise ValueError(f"velocity must be callable as velocity(x, t) -> Tensor, got {type(velocity).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable as callback(step, t, t_next, x, stage) or None, "
                         f"got {type(callback).__name__}")
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 (Euler) or 2 (RF-Solver-2), got {order!r}")


def _evaluate(velocity, x: Tensor, t: float) -> Tensor:
    v = velocity(x, t)
    if not isinstance(v, Tensor) or v.shape != x.shape:
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"velocity(x, t={t:.6g}) returned {got}; it must return a tensor shaped as x, "
                         f"{tuple(x.shape)}")
    return v


def rf_solver(velocity: Velocity, x: Tensor, ts, order: int = 2, callback: Callback | None = None,
              form: str = "taylor") -> Solution:
    """Integrate ``dx/dt = velocity(x, t)`` from ``ts[0]`` to ``ts[-1]`` with RF-Solver.

    ``velocity(x, t)``: x shaped as ``x`` (any shape, e.g. FLUX's packed latents ``[B, N, C]``),
    ``t`` a Python float; returns a tensor shaped as x. ``ts``: the times, endpoints included
    (``steps + 1`` of them, a 1-D tensor, NumPy array or sequence), strictly decreasing to sample (1 -> 0),
    strictly increasing to invert (0 -> 1); see :func:`timesteps`. ``order``: 2 for RF-Solver-2
    (two evaluations per step: at ``(x, t)`` and at the Euler half step), 1 for Euler.
    ``callback(step, t, t_next, x, stage)``: called before each evaluation (see the module
    docstring); its return value is ignored. ``form``: ``"taylor"`` computes the update as the
    paper and the official code write it, ``x + h v + h^2 / 2 * (v_mid - v) / (h / 2)``;
    ``"midpoint"`` as ``x + h v_mid``, its algebraic equal.

    The arithmetic runs in x's dtype (keep x in float32 or float64 and cast inside ``velocity``
    for a half-precision model). Returns :class:`Solution` ``(x, nfe)``."""
    _check(velocity, x, callback, order)
    if form not in ("taylor", "midpoint"):
        raise ValueError(f"form must be 'taylor' (the paper's and official code's update) or 'midpoint' "
                         f"(its algebraic equal), got {form!r}")
    times = _times(ts)
    nfe = 0
    for step, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        h = t_next - t
        if callback is not None:
            callback(step, t, t_next, x, "main")
        v = _evaluate(velocity, x, t)
        nfe += 1
        if order == 1:
            x = x + h * v
            continue
        x_mid = x + (h / 2) * v
        if callback is not None:
            callback(step, t, t_next, x_mid, "midpoint")
        v_mid = _evaluate(velocity, x_mid, t + h / 2)
        nfe += 1
        if form == "taylor":
            derivative = (v_mid - v) / (h / 2)  # v' along the trajectory, forward difference over h/2
            x = x + h * v + (h * h / 2) * derivative
        else:
            x = x + h * v_mid
    return Solution(x, nfe)


def euler(velocity: Velocity, x: Tensor, ts, callback: Callback | None = None) -> Solution:
    """Euler's method along ``ts`` (the vanilla rectified-flow sampler: ``x + h v(x, t)``), one
    evaluation per step, every one with stage ``"main"``; arguments as :func:`rf_solver`."""
    return rf_solver(velocity, x, ts, order=1, callback=callback)


def _schedule(ts, steps, shift, image_seq_len):
    if ts is not None:
        if steps is not None or shift is not None or image_seq_len is not None:
            raise ValueError("give ts, or steps (with shift or image_seq_len), not both")
        return ts
    if steps is None:
        raise ValueError("give steps (the number of solver steps) or ts (the times)")
    return timesteps(steps, shift, image_seq_len=image_seq_len)


def sample(velocity: Velocity, noise: Tensor, steps: int | None = None, *, shift: float | None = None,
           image_seq_len: int | None = None, ts=None, order: int = 2, callback: Callback | None = None,
           form: str = "taylor") -> Solution:
    """Noise (t = 1) to data (t = 0): ``steps`` steps on :func:`timesteps` (``shift`` /
    ``image_seq_len`` as there), or the decreasing times ``ts``. ``order``, ``callback``,
    ``form`` as in :func:`rf_solver`."""
    times = _times(_schedule(ts, steps, shift, image_seq_len))
    if times[0] < times[-1]:
        raise ValueError(f"sample runs from noise to data: ts must decrease, got {times[0]} -> {times[-1]}; "
                         "use invert for data -> noise")
    return rf_solver(velocity, noise, times, order=order, callback=callback, form=form)


def invert(velocity: Velocity, x0: Tensor, steps: int | None = None, *, shift: float | None = None,
           image_seq_len: int | None = None, ts=None, order: int = 2, callback: Callback | None = None,
           form: str = "taylor") -> Solution:
    """Data (t = 0) to noise (t = 1): the schedule of :func:`sample` with the same arguments,
    reversed (so sampling step ``n - 1 - i`` covers the interval of inversion step ``i``), or the
    increasing times ``ts``. Sampling the returned noise with the same schedule reconstructs
    ``x0`` up to the solver's error."""
    times = _schedule(ts, steps, shift, image_seq_len)
    if ts is None:
        times = times.flip(0)
    times = _times(times)
    if times[0] > times[-1]:
        raise ValueError(f"invert runs from data to noise: ts must increase, got {times[0]} -> {times[-1]}; "
                         "use sample for noise -> data")
    return rf_solver(velocity, x0, times, order=order, callback=callback, form=form)


# -- a flow with a closed form: the reference for tests, docs and benchmarks ------------------------


class GaussianFlow:
    """The rectified flow between data ``x0 ~ N(mean, std^2)`` and noise ``N(0, 1)``, per element
    and independent, whose velocity field and trajectories are known in closed form.

    With ``x_t = (1 - t) x0 + t noise`` the marginal at t is ``N(m(t), s(t)^2)``, ``m(t) = (1 - t)
    mean``, ``s(t)^2 = (1 - t)^2 std^2 + t^2``. Its flow-matching velocity (``E[noise - x0 | x_t]``)
    is affine in x, ``v(x, t) = -mean + s'(t) / s(t) * (x - m(t))``, and the ODE's solution keeps
    the standardised coordinate: ``x(t1) = m(t1) + s(t1) / s(t0) * (x(t0) - m(t0))``. ``mean`` /
    ``std``: floats or tensors broadcastable to x (``std > 0``)."""

    def __init__(self, mean=0.0, std=1.0):
        std_t = torch.as_tensor(std, dtype=torch.float64)
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ValueError(f"std must be finite and > 0, got {std!r}")
        self.mean, self.std = mean, std

    def _moments(self, t):
        m = (1 - t) * self.mean
        var = (1 - t) ** 2 * self.std ** 2 + t ** 2
        return m, var

    def velocity(self, x: Tensor, t: float) -> Tensor:
        """``v(x, t)``, shaped as x."""
        m, var = self._moments(t)
        rate = (t - (1 - t) * self.std ** 2) / var  # s'(t) / s(t)
        return -self.mean + rate * (x - m)

    def flow(self, x: Tensor, t: float, t_to: float) -> Tensor:
        """The exact solution at ``t_to`` of the trajectory through ``x`` at ``t``."""
        m, var = self._moments(t)
        m_to, var_to = self._moments(t_to)
        ratio = var_to / var
        ratio = ratio.sqrt() if isinstance(ratio, Tensor) else math.sqrt(ratio)
        return m_to + ratio * (x - m)


# -- diffusers: a scheduler that runs RF-Solver-2 inside a pipeline's own loop -----------------------

try:
    from diffusers import FlowMatchEulerDiscreteScheduler as _FlowMatchEuler
except ImportError:  # pragma: no cover - the solver above needs only torch
    _FlowMatchEuler = None

if _FlowMatchEuler is not None:

    class RFSolverScheduler(_FlowMatchEuler):
        """RF-Solver-2 as a diffusers scheduler, for pipelines that loop over
        ``scheduler.timesteps`` calling the model once per entry (FluxPipeline, SD3).

        Two model calls per solver step fit diffusers' loop the way its own
        ``FlowMatchHeunDiscreteScheduler`` does it: :meth:`set_timesteps` interleaves each step's
        time with its midpoint (``2 * steps`` entries, ``order = 2``), the first ``step()`` of a
        pair returns the Euler half step ``x_mid`` (the latents the pipeline feeds the model
        next), the second returns RF-Solver's update from the pair's start. The schedule is
        FlowMatchEulerDiscreteScheduler's (FLUX's ``mu`` shift, SD3's ``shift``, its sigma
        options), so ``RFSolverScheduler.from_config(pipe.scheduler.config)`` swaps it in; the
        same arithmetic as :func:`rf_solver` (``form="taylor"``), in float32 like diffusers'
        schedulers. ``stage`` / ``solver_step`` say what the next model call evaluates
        (``"main"`` / ``"midpoint"`` of solver step ``solver_step``) for hooks.
        Not supported: ``stochastic_sampling``, ``invert_sigmas``, per-token timesteps,
        starting mid-schedule (img2img ``strength``)."""

        order = 2

        def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                          timesteps=None):
            if self.config.stochastic_sampling or self.config.invert_sigmas:
                raise ValueError("RFSolverScheduler integrates the ODE from noise (t = 1) to data; its config has "
                                 f"stochastic_sampling={self.config.stochastic_sampling}, invert_sigmas="
                                 f"{self.config.invert_sigmas}; accepted: both False")
            super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
            main = self.sigmas  # [steps + 1], the terminal 0 appended
            mid = (main[:-1] + main[1:]) / 2
            # sigmas[k] is the time of timesteps[k]: t_0, mid_0, t_1, mid_1, ..., then the terminal 0
            self.sigmas = torch.cat([torch.stack([main[:-1], mid], dim=1).flatten(), main[-1:]])
            self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
            self._pending = None

        @property
        def stage(self) -> str:
            """What the next model call evaluates: ``"main"`` or ``"midpoint"``."""
            return STAGES[(self._step_index or self._begin_index or 0) % 2]

        @property
        def solver_step(self) -> int:
            """The solver step the next model call belongs to (0 first)."""
            return (self._step_index or self._begin_index or 0) // 2

        def step(self, model_output: Tensor, timestep, sample: Tensor, *args, return_dict: bool = True, **kwargs):
            """Advance by one model call: the Euler half step after a main call, RF-Solver's update
            after a midpoint call. ``model_output`` the velocity, shaped as ``sample``."""
            if self.step_index is None:
                self._init_step_index(timestep)
            k = self._step_index
            if k >= len(self.timesteps):
                raise ValueError(f"step() was called {k + 1} times for {len(self.timesteps)} timesteps; call "
                                 "set_timesteps again before a new run")
            t, t_next = self.sigmas[k - k % 2].item(), self.sigmas[k - k % 2 + 2].item()
            h = t_next - t
            v = model_output.to(torch.float32)
            if k % 2 == 0:
                x = sample.to(torch.float32)
                self._pending = (x, v)
                out = x + (h / 2) * v
            else:
                if getattr(self, "_pending", None) is None:
                    raise ValueError("a midpoint step() came without its main step; call set_timesteps again")
                x, v_main = self._pending
                derivative = (v - v_main) / (h / 2)
                out = x + h * v_main + (h * h / 2) * derivative
                self._pending = None
            self._step_index += 1
            out = out.to(model_output.dtype)
            if not return_dict:
                return (out,)
            from diffusers.schedulers.scheduling_flow_match_euler_discrete import \
                FlowMatchEulerDiscreteSchedulerOutput
            return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=out)

    __all__.append("RFSolverScheduler")
