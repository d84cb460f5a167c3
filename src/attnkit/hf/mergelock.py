"""MergeLock: make a fine-tuned model unmergeable without changing what it computes.

Paper: *Model Unmerging: Making Your Models Unmergeable for Secure Model Sharing* (Wang, Yang, Yin,
Liu, Shen, 2025), arXiv 2509.01548; official code github.com/hetailang/Merge-Lock.

Attention only ever uses the query and key projections through the product ``q·k`` and the value
and output projections through ``W_O · v``. For every layer and every KV head ``g`` (shapes: head
dim D, width C; ``nn.Linear`` weights are ``[out, in]``):

    k' = B_g k          (rows of W_K and b_K of head g:   W_K,g  <- B_g W_K,g)
    q' = B_g^{-T} q     (every query head h of group g:   W_Q,h  <- B_g^{-T} W_Q,h)
    v' = N_g v          (W_V,g <- N_g W_V,g, b_V,g <- N_g b_V,g)
    W_O[:, h] <- W_O[:, h] N_g^{-1}   for every query head h of group g

so ``q'·k' = q·k`` and ``W_O,h v'_h = W_O,h v_h``: the locked model's logits equal the original's up
to round-off, while its attention weights now sit in a random basis. Task arithmetic
``base + λ(A - base) + λ(B - base)`` or averaging ``(A + B) / 2`` with a locked ``A`` mixes weights
that no longer live in the same coordinates, and the merged model breaks (the paper: > 95 % loss
of performance in most cases).

**RoPE.** The rotary embedding sits between the projection and the dot product:
``score = (R_m q)·(R_n k) = q·R_{n-m} k`` with ``R_p`` a rotation by ``p θ_i`` in each rotary pair
(transformers' ``rotate_half`` layout pairs dims ``i`` and ``i + d/2`` of the rotary part, ``d`` the
rotary dim). A dense ``B`` does not commute with ``R_p``, so the lock uses, on the rotary dims, a
block-diagonal ``B``: on pair ``i``, ``s_i · Rot(φ_i)`` (a scaled 2x2 rotation, random angle and
log-uniform scale in ``[1/spread, spread]``). These are exactly the 2x2 matrices that commute with
every rotation of their plane, and ``B^{-T}`` on that pair is ``Rot(φ_i) / s_i`` — the same kind,
so ``(R_m B^{-T} q)·(R_n B k) = q·R_{n-m} k`` at every pair of positions. The dims that RoPE leaves
alone (``partial_rotary_factor < 1``, Phi-3 style) get a dense random invertible block, and so does
the whole V/O transform ``N_g`` (no position enters there): ``U diag(σ) Vᵀ`` with ``U, V`` Haar
orthogonal and ``σ`` log-uniform in ``[1/spread, spread]`` (condition number at most ``spread²``,
which bounds the round-off in bf16).

*Against the official code:* the official repository could not be read from here (no copy of it
was reachable when this was written), so this form is derived from the paper's statement (random
invertible matrices on the QK and VO branches) and from the RoPE constraint above; on a model
without RoPE the paper's dense random invertible QK matrix is what ``B`` would be, but every
architecture this module accepts uses RoPE, where a dense ``B`` would change the model's outputs.
Per-head (not per-layer) matrices are the finest invariance attention allows: a query head's
``B^{-T}`` must match the key head it reads, so GQA shares ``B_g`` across a group.

**GQA / biases / fused projections.** ``B_g`` and ``N_g`` are per KV head, applied to every query
head of the group; q/k/v biases (Qwen2) are transformed with their rows (the value bias passes
through attention unchanged because the weights of each row sum to 1); a fused ``qkv_proj``
(Phi-3) is split by rows. Models that normalise q or k per head after the projection (``q_norm`` /
``k_norm``: Gemma 3, Qwen 3) cannot carry a QK transform in their weights (the RMS norm is not
linear): lock them with ``branches=("vo",)``; a ``ValueError`` says so.

Usage (in place, like :func:`attnkit.hf.apply`: models are large, and a copy is one ``deepcopy``
away)::

    key = lock(model, seed=1234)        # model is now locked; its outputs are unchanged
    key.save("model.mergelock")          # keep the key private
    model.save_pretrained("shared/")     # share the locked weights
    ...
    unlock(model, MergeLockKey.load("model.mergelock"))   # the original weights, to round-off

**What it does not stop** (measured in ``benchmarks/mergelock.py``, see docs/hf-mergelock.md): an
attacker who holds the public base model can fit, per head and in closed form, the matrices that
map the locked weights back onto the base's (:func:`estimate_key`, least squares restricted to the
lock's own family, so the estimate keeps the model's function); because a fine-tune stays close to
its base — the very premise of merging — the fit recovers the lock and merging works again. (The
paper reports that the low-cost restorations it tried fail; which ones could not be checked here.)
Task arithmetic with λ = 1 is not stopped either: ``base + (A_locked - base) + (B - base)`` is
``A_locked + (B - base)``, A's function intact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .._console import write_atomic

__all__ = ["MergeLockKey", "lock", "unlock", "estimate_key", "model_shape", "SUPPORTED", "BRANCHES"]

#: model types whose attention this module knows (rotate_half RoPE, q/k/v/o or fused qkv/o projections)
SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
BRANCHES = ("qk", "vo")
_SHAPE_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "rotary_dim")
_KEY_VERSION = 1


@dataclass(frozen=True, eq=False)
class MergeLockKey:
    """The secret of one lock: per layer, ``qk[layer]`` ``[Hkv, D, D]`` holds each KV head's key-side
    matrix ``B_g`` (queries get ``B_g^{-T}``) and ``vo[layer]`` ``[Hkv, D, D]`` each KV head's value-side
    ``N_g`` (the output projection gets ``N_g^{-1}``); float64. ``None`` for a branch not locked.
    ``shape``: the model's ``num_layers, num_heads, num_kv_heads, head_dim, rotary_dim``."""

    seed: int | None
    shape: dict
    qk: tuple | None
    vo: tuple | None

    def __post_init__(self):
        if not isinstance(self.shape, dict) or sorted(self.shape) != sorted(_SHAPE_FIELDS):
            raise ValueError(f"MergeLockKey: shape must be a dict with keys {list(_SHAPE_FIELDS)}, got {self.shape!r}")
        if self.qk is None and self.vo is None:
            raise ValueError("MergeLockKey: qk and vo are both None; a key locks at least one branch")
        L, Hkv, D = self.shape["num_layers"], self.shape["num_kv_heads"], self.shape["head_dim"]
        for name in BRANCHES:
            mats = getattr(self, name)
            if mats is None:
                continue
            if len(mats) != L or any(not isinstance(m, torch.Tensor) or tuple(m.shape) != (Hkv, D, D) for m in mats):
                got = [tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__ for m in mats]
                raise ValueError(f"MergeLockKey: {name} must hold {L} tensors of shape {(Hkv, D, D)} "
                                 f"[num_kv_heads, head_dim, head_dim], got {got}")
            for layer, m in enumerate(mats):
                # a singular (or corrupted) matrix cannot be undone: refuse it here, not mid-unlock
                if not torch.isfinite(m).all() or torch.linalg.cond(m.double()).max() > 1e12:
                    raise ValueError(f"MergeLockKey: the {name} matrix of layer {layer} is not invertible "
                                     "(non-finite or condition number > 1e12)")

    @property
    def branches(self) -> tuple[str, ...]:
        return tuple(b for b in BRANCHES if getattr(self, b) is not None)

    def save(self, path) -> Path:
        """Write the key to ``path`` atomically (a temporary file in the same folder, then a rename:
        a crash never leaves half a key). Returns the path."""
        path = Path(path)
        payload = {"version": _KEY_VERSION, "seed": self.seed, "shape": dict(self.shape),
                   "qk": None if self.qk is None else torch.stack(self.qk),
                   "vo": None if self.vo is None else torch.stack(self.vo)}
        return write_atomic(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path) -> "MergeLockKey":
        """Read a key written by :meth:`save`; ``ValueError`` when the file is not one."""
        try:
            payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"MergeLockKey.load: {str(path)!r} is not a MergeLock key ({err})") from err
        if not isinstance(payload, dict) or payload.get("version") != _KEY_VERSION:
            raise ValueError(f"MergeLockKey.load: {str(path)!r} is not a MergeLock key (version {_KEY_VERSION})")
        return cls(seed=payload["seed"], shape=payload["shape"],
                   qk=None if payload["qk"] is None else tuple(payload["qk"].unbind(0)),
                   vo=None if payload["vo"] is None else tuple(payload["vo"].unbind(0)))


# -- the model's attention, as rows and columns of its weights -----------------------------------


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model must be a transformers model with a .config, got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model) -> dict:
    """``{num_layers, num_heads, num_kv_heads, head_dim, rotary_dim}`` of a supported model, else a
    ``ValueError`` naming its type and the supported ones."""
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"MergeLock: model_type {model_type!r} is not supported; accepted: {', '.join(SUPPORTED)} "
                         "(rotate_half RoPE, separate q/k/v/o or fused qkv/o projections)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "rope_type" not in rope and rope:  # per layer type (Gemma 3): one dict each
        factors = {v.get("partial_rotary_factor", 1.0) for v in rope.values() if isinstance(v, dict)}
    else:
        factors = {rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))}
    if len(factors) != 1:
        raise ValueError(f"MergeLock: the model's layer types use different partial_rotary_factor {sorted(factors)}")
    rotary_dim = int(head_dim * factors.pop())
    if rotary_dim % 2:
        raise ValueError(f"MergeLock: rotary dim {rotary_dim} is odd; RoPE pairs need an even number")
    return {"num_layers": config.num_hidden_layers, "num_heads": heads, "num_kv_heads": kv_heads,
            "head_dim": head_dim, "rotary_dim": rotary_dim}


def _attention_modules(model, num_layers: int) -> list:
    mods = [m for m in model.modules() if hasattr(m, "o_proj") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))]
    if len(mods) != num_layers:
        raise ValueError(f"MergeLock: found {len(mods)} attention modules with q/k/v/o (or qkv/o) projections, "
                         f"but the config says num_hidden_layers={num_layers}; this layout is not supported")
    return mods


class _Rows:
    """Rows ``[start, stop)`` of a Linear's weight and bias (a slice of a fused projection)."""

    def __init__(self, linear, start: int, stop: int):
        self.linear, self.start, self.stop = linear, start, stop

    def left_multiply(self, mats: torch.Tensor):
        """``W[rows of head j] <- mats[j] @ W[rows of head j]`` (and the bias), float64 math; mats [H, D, D]."""
        H, D, _ = mats.shape
        w = self.linear.weight
        block = w.data[self.start:self.stop].double().view(H, D, -1)            # (H, D, C)
        mats = mats.to(block.device)  # the key lives on the CPU, the model wherever it was loaded
        w.data[self.start:self.stop] = (mats @ block).reshape(H * D, -1).to(w.dtype)
        b = self.linear.bias
        if b is not None:
            vec = b.data[self.start:self.stop].double().view(H, D, 1)
            b.data[self.start:self.stop] = (mats @ vec).reshape(-1).to(b.dtype)

    def stacked(self, H: int) -> torch.Tensor:
        """``[H, D, C (+1 with a bias)]`` float64: each head's rows, bias appended as a column."""
        w = self.linear.weight.data[self.start:self.stop].double()
        if self.linear.bias is not None:
            w = torch.cat([w, self.linear.bias.data[self.start:self.stop].double()[:, None]], dim=1)
        return w.cpu().view(H, w.shape[0] // H, -1)


def _projections(attn, shape: dict, branches) -> dict:
    H, Hkv, D = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    if "qk" in branches and (hasattr(attn, "q_norm") or hasattr(attn, "k_norm")):
        raise ValueError(f"MergeLock: {type(attn).__name__} normalises q/k per head (q_norm/k_norm), which no weight "
                         "transform passes through; lock only the value/output branch: branches=('vo',)")
    if "vo" in branches and hasattr(attn, "v_norm"):
        raise ValueError(f"MergeLock: {type(attn).__name__} normalises v per head (v_norm); lock branches=('qk',)")
    if hasattr(attn, "qkv_proj"):
        fused = attn.qkv_proj
        if fused.weight.shape[0] != (H + 2 * Hkv) * D:
            raise ValueError(f"MergeLock: qkv_proj has {fused.weight.shape[0]} rows, expected (num_heads + 2 * "
                             f"num_kv_heads) * head_dim = {(H + 2 * Hkv) * D}")
        q, k, v = (_Rows(fused, 0, H * D), _Rows(fused, H * D, (H + Hkv) * D),
                   _Rows(fused, (H + Hkv) * D, (H + 2 * Hkv) * D))
    else:
        q, k, v = (_Rows(attn.q_proj, 0, H * D), _Rows(attn.k_proj, 0, Hkv * D), _Rows(attn.v_proj, 0, Hkv * D))
        for name, rows in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            if rows.linear.weight.shape[0] != rows.stop:
                raise ValueError(f"MergeLock: {name} has {rows.linear.weight.shape[0]} output rows, expected "
                                 f"{rows.stop} from the config's heads x head_dim")
    if attn.o_proj.weight.shape[1] != H * D:
        raise ValueError(f"MergeLock: o_proj takes {attn.o_proj.weight.shape[1]} inputs, expected num_heads * "
                         f"head_dim = {H * D}")
    return {"q": q, "k": k, "v": v, "o": attn.o_proj}


def _right_multiply_columns(linear, mats: torch.Tensor):
    """``W_O[:, head j] <- W_O[:, head j] @ mats[j]``; mats [H, D, D]."""
    H, D, _ = mats.shape
    w = linear.weight
    block = w.data.double().view(w.shape[0], H, D).transpose(0, 1)             # (H, C, D)
    mats = mats.to(block.device)
    w.data.copy_((block @ mats).transpose(0, 1).reshape(w.shape[0], H * D).to(w.dtype))


def _transform(model, key: MergeLockKey, inverse: bool) -> None:
    shape = model_shape(model)
    mismatch = [f"{f}: key {key.shape[f]} vs model {shape[f]}" for f in _SHAPE_FIELDS if key.shape[f] != shape[f]]
    if mismatch:
        raise ValueError(f"MergeLock: the key was made for another shape of model ({'; '.join(mismatch)})")
    group = shape["num_heads"] // shape["num_kv_heads"]
    with torch.no_grad():
        for layer, attn in enumerate(_attention_modules(model, shape["num_layers"])):
            proj = _projections(attn, shape, key.branches)
            if key.qk is not None:
                b = key.qk[layer].double()
                b_inv = torch.linalg.inv(b)
                k_side, q_side = (b_inv, b.transpose(-1, -2)) if inverse else (b, b_inv.transpose(-1, -2))
                proj["k"].left_multiply(k_side)
                proj["q"].left_multiply(q_side.repeat_interleave(group, dim=0))
            if key.vo is not None:
                n = key.vo[layer].double()
                n_inv = torch.linalg.inv(n)
                v_side, o_side = (n_inv, n) if inverse else (n, n_inv)
                proj["v"].left_multiply(v_side)
                _right_multiply_columns(proj["o"], o_side.repeat_interleave(group, dim=0))


# -- sampling ------------------------------------------------------------------------------------


def _haar(gen, n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed, not biased by QR's convention


def _dense(gen, n: int, spread: float) -> torch.Tensor:
    sigma = torch.exp((2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1) * math.log(spread))
    return _haar(gen, n) @ torch.diag(sigma) @ _haar(gen, n).T


def _qk_matrix(gen, head_dim: int, rotary_dim: int, spread: float) -> torch.Tensor:
    """``B`` [D, D]: a scaled rotation on each rotate_half pair (i, i + d/2) of the rotary dims, a dense
    invertible block on the rest."""
    half = rotary_dim // 2
    b = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    if half:
        angle = 2 * math.pi * torch.rand(half, generator=gen, dtype=torch.float64)
        scale = torch.exp((2 * torch.rand(half, generator=gen, dtype=torch.float64) - 1) * math.log(spread))
        i = torch.arange(half)
        b[i, i] = b[i + half, i + half] = scale * torch.cos(angle)
        b[i, i + half] = -scale * torch.sin(angle)
        b[i + half, i] = scale * torch.sin(angle)
    if rotary_dim < head_dim:
        b[rotary_dim:, rotary_dim:] = _dense(gen, head_dim - rotary_dim, spread)
    return b


def _check_branches(branches) -> tuple[str, ...]:
    if isinstance(branches, str):
        branches = (branches,)
    try:
        out = tuple(dict.fromkeys(branches))
    except TypeError:
        out = None
    if not out or any(b not in BRANCHES for b in out):
        raise ValueError(f"branches must be a non-empty collection of {BRANCHES}, got {branches!r}")
    return out


def lock(model, seed: int = 0, *, branches=BRANCHES, spread: float = 4.0) -> MergeLockKey:
    """Lock ``model`` in place and return the key that unlocks it.

    ``seed`` (int >= 0): the random matrices are a function of it (and of the model's shape) only.
    ``branches``: ``("qk", "vo")`` (default) or one of them. ``spread`` (finite, >= 1): scales and
    singular values are log-uniform in ``[1/spread, spread]``; larger disrupts merging more but costs
    round-off (condition number up to ``spread**2``); 1 gives orthogonal matrices.
    The model's logits are unchanged up to the round-off of its dtype. Raises ``ValueError`` for an
    unsupported model or layout, a bad seed, branch or spread.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not math.isfinite(spread) or spread < 1:
        raise ValueError(f"spread must be a finite number >= 1 (scales and singular values lie in [1/spread, spread]; "
                         f"0 or inf would make the matrices singular), got {spread!r}")
    branches = _check_branches(branches)
    shape = model_shape(model)
    for attn in _attention_modules(model, shape["num_layers"]):
        _projections(attn, shape, branches)  # refuse an unsupported layout before changing any weight
    gen = torch.Generator().manual_seed(seed)
    L, Hkv, D = shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]
    qk = tuple(torch.stack([_qk_matrix(gen, D, shape["rotary_dim"], spread) for _ in range(Hkv)]) for _ in range(L))
    vo = tuple(torch.stack([_dense(gen, D, spread) for _ in range(Hkv)]) for _ in range(L))
    key = MergeLockKey(seed=seed, shape=shape, qk=qk if "qk" in branches else None,
                       vo=vo if "vo" in branches else None)
    _transform(model, key, inverse=False)
    return key


def unlock(model, key: MergeLockKey) -> None:
    """Undo :func:`lock` in place (the original weights, to the round-off of the model's dtype).
    ``ValueError`` when ``key`` is not a :class:`MergeLockKey` or was made for another shape of model."""
    if not isinstance(key, MergeLockKey):
        raise ValueError(f"key must be a MergeLockKey (from lock() or MergeLockKey.load), got {type(key).__name__}")
    _transform(model, key, inverse=True)


# -- the attack: fitting the lock against a reference of the same base ----------------------------


def _fit_qk(locked: torch.Tensor, ref: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """``B`` of the lock's family minimising ``||B^{-1} locked - ref||`` per head; [H, D, C] -> [H, D, D].

    Fits ``X = B^{-1}`` (same family: scaled rotations on pairs, dense on the rest) by least squares:
    on a pair with rows ``p1, p2`` of the locked and ``r1, r2`` of the reference, ``X = [[a, -b], [b, a]]``
    has the closed form ``a = (r1·p1 + r2·p2) / S``, ``b = (r2·p1 - r1·p2) / S``, ``S = |p1|² + |p2|²``."""
    H, D, _ = locked.shape
    half = rotary_dim // 2
    x = torch.zeros(H, D, D, dtype=torch.float64)
    p1, p2 = locked[:, :half], locked[:, half:rotary_dim]
    r1, r2 = ref[:, :half], ref[:, half:rotary_dim]
    s = (p1 * p1).sum(-1) + (p2 * p2).sum(-1)
    a = ((r1 * p1).sum(-1) + (r2 * p2).sum(-1)) / s
    b = ((r2 * p1).sum(-1) - (r1 * p2).sum(-1)) / s
    i = torch.arange(half)
    x[:, i, i] = x[:, i + half, i + half] = a
    x[:, i, i + half], x[:, i + half, i] = -b, b
    if rotary_dim < D:
        x[:, rotary_dim:, rotary_dim:] = _fit_dense(locked[:, rotary_dim:], ref[:, rotary_dim:])
    return torch.linalg.inv(x)


def _fit_dense(locked: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``X`` minimising ``||X locked - ref||`` per head (``X = ref locked⁺``); [H, D, C] -> [H, D, D]."""
    return ref @ torch.linalg.pinv(locked)


def estimate_key(locked_model, reference_model, *, branches=BRANCHES) -> MergeLockKey:
    """Estimate a lock without its key, from a reference model of the same base (the public base
    model, or any fine-tune of it): per layer and KV head, the matrices of the lock's own family that
    map the locked key/value rows onto the reference's, by least squares (closed form, no data).
    ``unlock(locked_model, estimate)`` keeps the locked model's function (the estimate is in the
    family that commutes with RoPE) and brings its weights back near the reference's coordinates.

    This is the restoration an attacker who wants to merge would try; it works because a fine-tune
    stays near its base (see docs/hf-mergelock.md for the measured effect)."""
    branches = _check_branches(branches)
    shape = model_shape(locked_model)
    ref_shape = model_shape(reference_model)
    mismatch = [f"{f}: {shape[f]} vs {ref_shape[f]}" for f in _SHAPE_FIELDS if shape[f] != ref_shape[f]]
    if mismatch:
        raise ValueError(f"estimate_key: locked_model and reference_model differ ({'; '.join(mismatch)})")
    Hkv, L = shape["num_kv_heads"], shape["num_layers"]
    qk, vo = [], []
    pairs = zip(_attention_modules(locked_model, L), _attention_modules(reference_model, L))
    for attn, ref in pairs:
        p, r = _projections(attn, shape, branches), _projections(ref, shape, branches)
        if "qk" in branches:
            qk.append(_fit_qk(p["k"].stacked(Hkv), r["k"].stacked(Hkv), shape["rotary_dim"]))
        if "vo" in branches:
            vo.append(torch.linalg.inv(_fit_dense(p["v"].stacked(Hkv), r["v"].stacked(Hkv))))
    return MergeLockKey(seed=None, shape=shape, qk=tuple(qk) if qk else None, vo=tuple(vo) if vo else None)
