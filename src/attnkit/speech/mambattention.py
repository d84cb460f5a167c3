"""MambAttention: Mamba with shared time- and frequency-multi-head attention, for speech enhancement.

Paper: MambAttention: Mamba with Multi-Head Attention for Generalizable Single-Channel Speech
Enhancement (Kühne, Jensen, Østergaard and Tan, arXiv 2507.00966). Official code:
github.com/NikolaiKyhne/MambAttention (read for this module; nothing copied).

A spectrogram feature map ``x [B, C, T, F]`` (C channels, T frames, F frequency bins) goes through
blocks that attend and scan along time, then along frequency::

    X_t = reshape(x, [B*F, T, C])
    X_1 = X_t + MHA(LN(X_t))                 (T-MHA: every frame attends to all frames of its bin)
    X_2 = X_1 + BiMamba_t(X_1)               (T-Mamba, bidirectional)
    X_f = reshape(X_2, [B*T, F, C])
    X_3 = X_f + MHA(LN(X_f))                 (F-MHA: the SAME LN and MHA weights as T-MHA)
    X_4 = X_3 + BiMamba_f(X_3)               (F-Mamba)
    y   = reshape(X_4, [B, C, T, F])

The attention weights are **shared between the time and the frequency axis**: one set of
``W_q, W_k, W_v, W_o`` (and, in the official code, one LayerNorm) serves both, which the paper's
ablation finds matters for out-of-domain generalisation. The attention has no positional encoding
(the official ``nn.MultiheadAttention`` adds none; Mamba supplies order). Here the attention is
attnkit's :class:`attnkit.layers.MultiHeadAttention` (``pattern="full"``, ``rope=False``, biases on:
the math of ``nn.MultiheadAttention``), so it runs through :func:`attnkit.ops.attend`.

The model (:class:`MambAttention`) follows the official one (MP-SENet / SEMamba lineage): input the
compressed magnitude ``|X|^0.3`` and the phase of the noisy STFT, a dense convolutional encoder that
halves F, the blocks, then a magnitude-mask decoder (learnable sigmoid, beta = 2, times the noisy
magnitude) and a phase decoder (two 1x1 convolutions and ``atan2``).

Options: ``attention="shared"`` (MambAttention), ``"separate"`` (own T- and F-MHA weights: the
paper's no-sharing ablation) or ``"none"`` (no attention: the SEMamba-style Mamba-only baseline).

Deviations from the official code (all on purpose, for a CPU-sized model):

- The dense blocks of the encoder and both decoders have ``dense_depth`` layers (official: 4), and
  the width, block count, heads, d_state and expand are small defaults (official: C = 64, 4 blocks,
  8 heads, d_state 16, expand 4, n_fft 400 at 16 kHz).
- The selective scan is :func:`attnkit.speech.mamba.selective_scan` (PyTorch, CPU), not the fused
  ``mamba_ssm`` CUDA kernel; RMSNorm is ``nn.RMSNorm`` (official: a Triton kernel).
- The 1x1 ``ConvTranspose1d`` 2C -> C after each bidirectional Mamba is an ``nn.Linear`` (same math).
- :func:`enhancement_loss` drops the metric-discriminator (PESQ) term of the official loss and keeps
  magnitude, anti-wrapped phase, complex, time and consistency terms with the official weights.

Shapes: blocks ``x [B, C, T, F] -> [B, C, T, F]``; the model ``magnitude, phase [B, F, T] ->
(magnitude, phase [B, F, T], complex [B, F, T, 2])`` with F = n_fft // 2 + 1 (odd: n_fft % 4 == 0).

Example::

    >>> import torch
    >>> from attnkit.speech import MambAttention
    >>> model = MambAttention(dim=16, num_heads=4, freq_bins=65, num_blocks=1)
    >>> mag, phase = torch.rand(2, 65, 20), torch.rand(2, 65, 20) * 6 - 3
    >>> out_mag, out_phase, out_complex = model(mag, phase)
    >>> out_mag.shape, out_complex.shape
    (torch.Size([2, 65, 20]), torch.Size([2, 65, 20, 2]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import positive_int
from ..cards import FlopCount
from ..layers import MultiHeadAttention
from .mamba import SCANS, BiMamba, bimamba_reference, mamba_flops

__all__ = ["ATTENTION", "AxisAttention", "MambAttentionBlock", "MambAttention", "enhancement_loss",
           "tf_attention_reference", "block_reference", "mambattention_flops"]

#: how a block attends: shared T/F weights (MambAttention), separate weights (ablation), none (SEMamba-style)
ATTENTION = ("shared", "separate", "none")


class AxisAttention(nn.Module):
    """LayerNorm then multi-head self-attention over one axis: ``x [N, L, C] -> [N, L, C]`` (the
    attention branch only; the block adds the residual). The official ``AttentionModule``."""

    def __init__(self, dim: int, num_heads: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads, pattern="full", rope=False, bias=True, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(self.norm(x))


class MambAttentionBlock(nn.Module):
    """One time-then-frequency block (module docstring): ``x [B, C, T, F] -> [B, C, T, F]``.

    Args:
        dim: C. num_heads: H of the attention (C % H == 0).
        attention: ``"shared"`` (one LN + MHA for both axes), ``"separate"`` or ``"none"``.
        d_state, d_conv, expand, scan, chunk_size: the Mamba layers' options (:class:`attnkit.speech.mamba.MambaBlock`).
        backend: the attention's :func:`attnkit.ops.attend` backend.
    """

    def __init__(self, dim: int, num_heads: int = 4, *, attention: str = "shared", d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, scan: str = "chunked", chunk_size: int = 8,
                 backend: str = "auto") -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if attention != "none" and dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (accepted: divisors of {dim})")
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(SCANS)}, got {scan!r}")
        self.dim, self.num_heads, self.attention = dim, num_heads, attention
        mamba = dict(d_state=d_state, d_conv=d_conv, expand=expand, scan=scan, chunk_size=chunk_size)
        self.time_mamba = BiMamba(dim, **mamba)
        self.freq_mamba = BiMamba(dim, **mamba)
        self.time_attention = self.freq_attention = None
        if attention != "none":
            self.time_attention = AxisAttention(dim, num_heads, backend=backend)
            # shared: the same module (so the same parameters) attends along both axes
            self.freq_attention = (self.time_attention if attention == "shared"
                                   else AxisAttention(dim, num_heads, backend=backend))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [B, C, T, F] with C = {self.dim}, got shape {tuple(x.shape)}")
        B, C, T, Fq = x.shape
        x = x.permute(0, 3, 2, 1).reshape(B * Fq, T, C)  # (B*F, T, C): sequences along time
        if self.time_attention is not None:
            x = x + self.time_attention(x)
        x = x + self.time_mamba(x)
        x = x.view(B, Fq, T, C).transpose(1, 2).reshape(B * T, Fq, C)  # (B*T, F, C): along frequency
        if self.freq_attention is not None:
            x = x + self.freq_attention(x)
        x = x + self.freq_mamba(x)
        return x.view(B, T, Fq, C).permute(0, 3, 1, 2)  # (B, C, T, F)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, attention={self.attention!r}"


# -- float64 references ------------------------------------------------------------------------
def _layer_norm_reference(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def _mha_reference(x: Tensor, module: AxisAttention, axis: str) -> Tensor:
    """Softmax attention written out over ``x [B, T, F, C]`` along ``axis`` ("time": the frames of
    each bin attend to each other; "freq": the bins of each frame), scores materialised, float64."""
    mha = module.attention
    H, D, C = mha.num_heads, mha.head_dim, mha.dim
    x = _layer_norm_reference(x.double(), module.norm)
    qkv = x @ mha.qkv_proj.weight.double().T + mha.qkv_proj.bias.double()
    q, k, v = (t.unflatten(-1, (H, D)) for t in qkv.split(C, dim=-1))  # (B, T, F, H, D)
    if axis == "time":
        scores = torch.einsum("btfhd,bsfhd->bfhts", q, k) / math.sqrt(D)
        out = torch.einsum("bfhts,bsfhd->btfhd", scores.softmax(-1), v)
    else:
        scores = torch.einsum("btfhd,btghd->bthfg", q, k) / math.sqrt(D)
        out = torch.einsum("bthfg,btghd->btfhd", scores.softmax(-1), v)
    return out.flatten(-2) @ mha.o_proj.weight.double().T + mha.o_proj.bias.double()


def tf_attention_reference(block: MambAttentionBlock, x: Tensor) -> tuple[Tensor, Tensor]:
    """The block's two attention branches on the same input ``x [B, C, T, F]``, in float64 and in
    the ``[B, C, T, F]`` layout: (time attention, frequency attention). With ``attention="shared"``
    both use the one LN + MHA; :meth:`MambAttentionBlock.forward` must agree with this when its
    Mamba layers are removed (tested)."""
    if block.time_attention is None:
        raise ValueError("block was built with attention='none': it has no attention to reference")
    x = x.double().permute(0, 2, 3, 1)  # (B, T, F, C)
    time = _mha_reference(x, block.time_attention, "time").permute(0, 3, 1, 2)
    freq = _mha_reference(x, block.freq_attention, "freq").permute(0, 3, 1, 2)
    return time, freq


def block_reference(block: MambAttentionBlock, x: Tensor) -> Tensor:
    """The whole block in float64, written from the paper's equations over ``[B, T, F, C]`` (attention
    by materialised scores, Mamba by the sequential scan): ``x [B, C, T, F] -> [B, C, T, F]``."""
    x = x.double().permute(0, 2, 3, 1)  # (B, T, F, C)
    B, T, Fq, C = x.shape
    if block.time_attention is not None:
        x = x + _mha_reference(x, block.time_attention, "time")
    along_time = x.transpose(1, 2).reshape(B * Fq, T, C)
    x = x + bimamba_reference(along_time, block.time_mamba).view(B, Fq, T, C).transpose(1, 2)
    if block.freq_attention is not None:
        x = x + _mha_reference(x, block.freq_attention, "freq")
    along_freq = x.reshape(B * T, Fq, C)
    x = x + bimamba_reference(along_freq, block.freq_mamba).view(B, T, Fq, C)
    return x.permute(0, 3, 1, 2)


# -- the model -----------------------------------------------------------------------------------
def _conv_norm_act(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.InstanceNorm2d(channels, affine=True), nn.PReLU(channels))


class DenseBlock(nn.Module):
    """Densely connected 3x3 convolutions, dilated 1, 2, 4, ... along time: ``[B, C, T, F] -> [B, C, T, F]``."""

    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _conv_norm_act(nn.Conv2d(dim * (i + 1), dim, (3, 3), dilation=(2**i, 1), padding=(2**i, 1)), dim)
            for i in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        skip = x
        for layer in self.layers:
            x = layer(skip)
            skip = torch.cat((x, skip), dim=1)
        return x


class MambAttention(nn.Module):
    """The MambAttention speech enhancement model (module docstring), small by default.

    Args:
        dim: C, the channels of the feature map (official 64).
        num_heads: H (official 8).
        freq_bins: F = n_fft // 2 + 1, odd and >= 3 (the encoder halves it to (F - 1) / 2).
        num_blocks: MambAttention blocks (official 4).
        attention: ``"shared"`` | ``"separate"`` | ``"none"`` (:data:`ATTENTION`).
        dense_depth: layers of each dense block (official 4).
        d_state, d_conv, expand, scan, chunk_size: Mamba options (official d_state 16, expand 4).
        beta: the learnable sigmoid's ceiling on the magnitude mask (official 2.0).
        backend: the attention's backend.

    ``forward(magnitude, phase)`` with compressed magnitude and phase ``[B, F, T]`` returns the
    enhanced ``(magnitude, phase, complex)``; :meth:`enhance` goes wave to wave.
    """

    def __init__(self, dim: int = 16, num_heads: int = 4, *, freq_bins: int = 65, num_blocks: int = 2,
                 attention: str = "shared", dense_depth: int = 2, d_state: int = 8, d_conv: int = 4, expand: int = 2,
                 scan: str = "chunked", chunk_size: int = 8, beta: float = 2.0, backend: str = "auto") -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_blocks, "num_blocks")
        positive_int(dense_depth, "dense_depth")
        positive_int(freq_bins, "freq_bins")
        if freq_bins < 3 or freq_bins % 2 == 0:
            raise ValueError(f"freq_bins must be odd and >= 3 (F = n_fft // 2 + 1 with n_fft % 4 == 0, so the "
                             f"encoder's stride-2 frequency conv inverts exactly), got {freq_bins}")
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta!r}")
        self.dim, self.num_heads, self.freq_bins, self.num_blocks = dim, num_heads, freq_bins, num_blocks
        self.attention, self.beta = attention, beta
        self.encoder = nn.Sequential(
            _conv_norm_act(nn.Conv2d(2, dim, (1, 1)), dim),
            DenseBlock(dim, dense_depth),
            _conv_norm_act(nn.Conv2d(dim, dim, (1, 3), stride=(1, 2)), dim),  # F -> (F - 1) / 2
        )
        self.blocks = nn.ModuleList(
            MambAttentionBlock(dim, num_heads, attention=attention, d_state=d_state, d_conv=d_conv, expand=expand,
                               scan=scan, chunk_size=chunk_size, backend=backend) for _ in range(num_blocks))
        self.mask_decoder = nn.Sequential(
            DenseBlock(dim, dense_depth),
            nn.ConvTranspose2d(dim, dim, (1, 3), stride=(1, 2)),  # back to F
            nn.Conv2d(dim, 1, (1, 1)),
            nn.InstanceNorm2d(1, affine=True), nn.PReLU(1),
            nn.Conv2d(1, 1, (1, 1)),
        )
        self.mask_slope = nn.Parameter(torch.ones(freq_bins, 1))  # learnable sigmoid, one slope per bin
        self.phase_decoder = nn.Sequential(
            DenseBlock(dim, dense_depth),
            _conv_norm_act(nn.ConvTranspose2d(dim, dim, (1, 3), stride=(1, 2)), dim),
        )
        self.phase_real = nn.Conv2d(dim, 1, (1, 1))
        self.phase_imag = nn.Conv2d(dim, 1, (1, 1))

    def forward(self, magnitude: Tensor, phase: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if magnitude.dim() != 3 or magnitude.shape[1] != self.freq_bins:
            raise ValueError(f"magnitude must be [B, F, T] with F = {self.freq_bins}, "
                             f"got shape {tuple(magnitude.shape)}")
        if phase.shape != magnitude.shape:
            raise ValueError(f"phase must have magnitude's shape {tuple(magnitude.shape)}, got {tuple(phase.shape)}")
        mag = magnitude.transpose(1, 2).unsqueeze(1)  # (B, 1, T, F)
        x = self.encoder(torch.cat((mag, phase.transpose(1, 2).unsqueeze(1)), dim=1))  # (B, C, T, (F-1)/2)
        for block in self.blocks:
            x = block(x)
        mask = self.mask_decoder(x)[:, 0]  # (B, T, F)
        mask = self.beta * torch.sigmoid(self.mask_slope * mask.transpose(1, 2))  # (B, F, T)
        out_mag = mask * magnitude
        features = self.phase_decoder(x)
        out_phase = torch.atan2(self.phase_imag(features), self.phase_real(features))[:, 0].transpose(1, 2)
        out_complex = torch.stack((out_mag * torch.cos(out_phase), out_mag * torch.sin(out_phase)), dim=-1)
        return out_mag, out_phase, out_complex

    def enhance(self, wave: Tensor, *, n_fft: int, hop: int, compress: float = 0.3) -> Tensor:
        """``wave [B, L] -> [B, L]``: STFT, the model, iSTFT (:mod:`attnkit.tasks.speech`'s helpers)."""
        from ..tasks.speech import istft, stft

        if n_fft // 2 + 1 != self.freq_bins:
            raise ValueError(f"n_fft={n_fft} gives {n_fft // 2 + 1} bins; this model takes freq_bins={self.freq_bins}")
        mag, phase = stft(wave, n_fft=n_fft, hop=hop, compress=compress)
        out_mag, out_phase, _ = self(mag, phase)
        return istft(out_mag, out_phase, n_fft=n_fft, hop=hop, length=wave.shape[-1], compress=compress)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, freq_bins={self.freq_bins}, num_blocks={self.num_blocks}, attention={self.attention!r}"


def _anti_wrap(x: Tensor) -> Tensor:
    return (x - torch.round(x / (2 * math.pi)) * 2 * math.pi).abs()


def enhancement_loss(model_out: tuple[Tensor, Tensor, Tensor], clean_wave: Tensor, *, n_fft: int, hop: int,
                     compress: float = 0.3) -> tuple[Tensor, dict]:
    """The official generator loss without its metric-discriminator term: ``0.9 mag MSE + 0.3 phase
    (instantaneous phase, group delay, instantaneous frequency, anti-wrapped) + 0.1 * 2 complex MSE +
    0.2 time L1 + 0.1 * 2 consistency MSE`` (the complex spectrum of the re-analysed output against the
    output). Returns (loss, the terms as floats)."""
    from ..tasks.speech import istft, stft

    out_mag, out_phase, out_complex = model_out
    clean_mag, clean_phase = stft(clean_wave, n_fft=n_fft, hop=hop, compress=compress)
    clean_complex = torch.stack((clean_mag * torch.cos(clean_phase), clean_mag * torch.sin(clean_phase)), dim=-1)
    wave = istft(out_mag, out_phase, n_fft=n_fft, hop=hop, length=clean_wave.shape[-1], compress=compress)
    re_mag, re_phase = stft(wave, n_fft=n_fft, hop=hop, compress=compress)
    re_complex = torch.stack((re_mag * torch.cos(re_phase), re_mag * torch.sin(re_phase)), dim=-1)
    terms = {
        "magnitude": F.mse_loss(out_mag, clean_mag),
        "phase": (_anti_wrap(clean_phase - out_phase).mean()
                  + _anti_wrap(torch.diff(clean_phase, dim=1) - torch.diff(out_phase, dim=1)).mean()
                  + _anti_wrap(torch.diff(clean_phase, dim=2) - torch.diff(out_phase, dim=2)).mean()),
        "complex": 2 * F.mse_loss(out_complex, clean_complex),
        "time": F.l1_loss(wave, clean_wave),
        "consistency": 2 * F.mse_loss(out_complex, re_complex),
    }
    weights = {"magnitude": 0.9, "phase": 0.3, "complex": 0.1, "time": 0.2, "consistency": 0.1}
    loss = sum(weights[k] * v for k, v in terms.items())
    return loss, {k: float(v.detach()) for k, v in terms.items()}


# -- FLOPs -------------------------------------------------------------------------------------------
def _dense_flops(positions: int, dim: int, depth: int) -> float:
    return sum(2.0 * positions * dim * (i + 1) * dim * 9 for i in range(depth))


def mambattention_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Forward FLOPs of :class:`MambAttention` on ``batch`` clips of ``seq`` frames T. Attention core
    per block: ``4 * (B F') H T^2 D`` along time + ``4 * (B T) H F'^2 D`` along frequency (F' = (F - 1) / 2);
    everything else (attention projections, four Mamba layers per block, encoder and decoders' convs)
    is ``projection_fwd``."""
    dim, heads = config["dim"], config["num_heads"]
    freq = config.get("freq_bins", 65)
    inner = (freq - 1) // 2
    blocks, depth = config.get("num_blocks", 2), config.get("dense_depth", 2)
    attention = config.get("attention", "shared")
    mamba = dict(d_state=config.get("d_state", 8), d_conv=config.get("d_conv", 4), expand=config.get("expand", 2))
    tokens = batch * seq * inner  # positions of the block's feature map
    core = projection = 0.0
    for _ in range(blocks):
        if attention != "none":
            core += 4.0 * batch * inner * seq * seq * dim + 4.0 * batch * seq * inner * inner * dim  # H * D = C
            projection += 2 * (2.0 * tokens * dim * 4 * dim)  # qkv and out projections, both axes
        projection += 4 * mamba_flops(tokens, dim, **mamba) + 2 * (2.0 * tokens * 2 * dim * dim)
    full = batch * seq * freq
    projection += 2.0 * full * 2 * dim + _dense_flops(full, dim, depth)  # encoder: 1x1 conv, dense block
    projection += 2.0 * tokens * dim * dim * 3  # encoder: the stride-2 frequency conv
    projection += 2 * (_dense_flops(tokens, dim, depth) + 2.0 * full * dim * dim * 3)  # decoders' dense + upsampling
    projection += 2.0 * full * dim * 3  # 1x1 heads
    return FlopCount(attention_fwd=core, projection_fwd=projection)
