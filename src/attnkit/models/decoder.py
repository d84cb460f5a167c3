"""A small pre-norm decoder language model whose attention is any registered mechanism.

    h = embed(tokens)
    for each layer:  h = h + attn(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))
    logits = RMSNorm(h) embed^T                 (tied input/output embeddings)

``attention`` names one registered mechanism for every layer, or a list with one name
per layer (interleaving, e.g. ``["mha", "sliding", "sliding", "mha"]``);
``attention_options`` is one dict for all layers or a list of dicts.

Modules that several layers use (MASA's dictionary of matrix atoms) belong to the model, in
``model.shared`` (an ``nn.ModuleDict``, empty for most mechanisms): one copy in the state dict
(``shared.masa.q``, ...), and, under a per-block FSDP wrapping, part of the root unit rather
than of one block that the others would reach into.

Example::

    >>> import torch
    >>> from attnkit.models import DecoderLM
    >>> model = DecoderLM(vocab_size=256, dim=64, num_layers=2, num_heads=4, attention="gqa")
    >>> logits = model(torch.randint(0, 256, (2, 16)))        # [B, T, V]
    >>> out = model.generate(torch.randint(0, 256, (2, 4)), max_new_tokens=8)  # [B, 12]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from .._checks import positive_int

__all__ = ["DecoderLM", "SwiGLU"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) * W_up x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim: int, attention: nn.Module, mlp_hidden: int, norm_eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attn = attention
        self.mlp_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: Tensor, state=None, document_ids: Tensor | None = None, group_ids: Tensor | None = None,
                embeddings: Tensor | None = None, context: dict | None = None) -> Tensor:
        extra = {}
        if getattr(self.attn, "accepts_layer_context", False):
            extra["context"] = context  # shared by the layers of one forward call (EchoAtt's leader -> followers)
        if getattr(self.attn, "accepts_group_ids", False):
            extra["group_ids"] = group_ids
        if getattr(self.attn, "accepts_embeddings", False):
            extra["embeddings"] = embeddings
        x = x + self.attn(self.attn_norm(x), state, document_ids=document_ids, **extra)
        return x + self.mlp(self.mlp_norm(x))


def _per_layer(value, num_layers: int, name: str, kind):
    if isinstance(value, kind):
        return [value] * num_layers
    value = list(value)
    if len(value) != num_layers:
        raise ValueError(f"{name} has {len(value)} entries but num_layers={num_layers}; give one per layer or a single value")
    return value


def _with_position(name: str, layer_idx: int, num_layers: int, options: dict, shared: nn.ModuleDict) -> dict:
    """Options plus the layer's place in the stack, for layers whose math depends on it
    (``accepts_layer_position``, e.g. Lightning's per-layer decay schedule), and the model's
    ``ModuleDict`` of modules its layers share (``accepts_shared_modules``, e.g. MASA's atoms:
    the layer puts its module there, the model owns it)."""
    layer = registry.get(name).layer
    extra = {}
    if getattr(layer, "accepts_layer_position", False):
        extra.update(layer_idx=layer_idx, num_layers=num_layers)
    if getattr(layer, "accepts_shared_modules", False):
        extra["shared"] = shared
    return {**extra, **options}


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, T] -> logits [B, T, V]``.

    Args:
        vocab_size: V.
        dim: width C.
        num_layers: number of blocks.
        num_heads: attention heads per layer.
        attention: a registered mechanism name, or a list of names (one per layer).
        attention_options: keyword options for the attention layers (dict or list of dicts).
        mlp_hidden: SwiGLU hidden width (default: 8/3 C rounded up to a multiple of 64).
        norm_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        attention="mha",
        attention_options=None,
        mlp_hidden: int | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("num_layers", num_layers), ("num_heads", num_heads)):
            positive_int(value, name)
        names = _per_layer(attention, num_layers, "attention", str)
        options = _per_layer(attention_options or {}, num_layers, "attention_options", dict)
        if mlp_hidden is None:
            mlp_hidden = -(-int(8 * dim / 3) // 64) * 64
        self.config = {
            "vocab_size": vocab_size,
            "dim": dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "attention": names,
            "attention_options": options,
            "mlp_hidden": mlp_hidden,
            "norm_eps": norm_eps,
        }
        self.embed = nn.Embedding(vocab_size, dim)
        # modules shared across layers, owned here (filled by the layers as they are built)
        self.shared = nn.ModuleDict()
        self.layers = nn.ModuleList(
            Block(dim, registry.build(n, dim=dim, num_heads=num_heads, **_with_position(n, i, num_layers, o, self.shared)),
                  mlp_hidden, norm_eps)
            for i, (n, o) in enumerate(zip(names, options))
        )
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.apply(self._init_weights)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, *, max_len: int | None = None) -> list:
        """One decode state per layer."""
        positive_int(batch_size, "batch_size")
        return [block.attn.init_state(batch_size, max_len=max_len) for block in self.layers]

    def forward(self, tokens: Tensor, state: list | None = None, *, document_ids: Tensor | None = None,
                group_ids: Tensor | None = None) -> Tensor:
        """``tokens [B, T]`` -> logits ``[B, T, V]``. ``group_ids [B]`` reaches layers that
        attend across the batch (Chronos-2 group attention); other layers ignore it."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [B, T], got {got}")
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state has {len(state)} entries, the model has {len(self.layers)} layers; use model.init_state()")
        return self.logits(self.hidden(tokens, state, document_ids=document_ids, group_ids=group_ids))

    def hidden(self, tokens: Tensor, state: list | None = None, *, document_ids: Tensor | None = None,
               group_ids: Tensor | None = None) -> Tensor:
        """The final normalised hidden states ``[B, T, C]`` (``forward`` without the output layer)."""
        x = embeddings = self.embed(tokens)
        context: dict = {}
        for i, block in enumerate(self.layers):
            x = block(x, None if state is None else state[i], document_ids, group_ids, embeddings, context)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Output layer (tied to the embedding): ``[..., C]`` -> ``[..., V]``."""
        return F.linear(hidden, self.embed.weight)

    def loss(self, tokens: Tensor, targets: Tensor, **kwargs) -> Tensor:
        """Mean next-token cross-entropy over the positions whose target is not ``-100``; the
        output layer runs only there (MQAR supervises a few positions per sequence, so a large
        vocabulary costs little)."""
        if not isinstance(targets, Tensor) or targets.shape != tokens.shape:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(f"targets must be a tensor shaped like tokens {tuple(tokens.shape)}, got {got}")
        hidden = self.hidden(tokens, **kwargs)
        keep = targets != -100
        logits = self.logits(hidden[keep])
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets[keep])

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``prompt [B, T]`` by ``max_new_tokens`` through the decode state.

        ``temperature=0`` is greedy; otherwise sample from ``softmax(logits / temperature)``,
        restricted to the ``top_k`` most likely tokens when given.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        state = self.init_state(prompt.shape[0])
        logits = self(prompt, state)[:, -1]
        out = [prompt]
        for _ in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, generator)
            out.append(token)
            logits = self(token, state)[:, -1]
        return torch.cat(out, dim=1)

    # -- persistence ------------------------------------------------------------------------
    def save_pretrained(self, path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into the folder ``path``.

        The files are written into a temporary folder beside ``path`` and moved into place
        only once both are complete, so a failed save (a full disk) leaves an existing
        checkpoint at ``path`` as it was. Other files in an existing folder are kept. The
        config records the parameters' dtype, which :meth:`from_pretrained` restores.
        """
        try:
            config = json.dumps({**self.config, **_dtype_fields(self)}, indent=2)
        except TypeError as err:
            raise ValueError(
                f"the model config cannot be saved as JSON ({err}); pass attention options as plain values "
                "(patterns by name, e.g. pattern='causal')"
            ) from None
        given = Path(path)
        # resolved: "." has no name to stage beside, and a symlinked folder is written through
        # (its target gets the new files) rather than replaced by a real folder
        path = given.resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"save_pretrained needs a folder, but {given} is a file")
        cwd = Path.cwd().resolve()
        if path == cwd or path in cwd.parents:
            # the save swaps in a new folder: the process (and its shell) would be left in the old one
            raise ValueError(f"save_pretrained({str(given)!r}) would replace the folder this process runs in "
                             f"({cwd}); save into a subfolder, e.g. save_pretrained('checkpoint')")
        path.parent.mkdir(parents=True, exist_ok=True)
        # not tempfile.mkdtemp: its 0700 mode would become the checkpoint's once renamed
        staging = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            if path.exists():
                shutil.copymode(path, staging)
            (staging / CONFIG_NAME).write_text(config)
            _write_weights(self, staging / WEIGHTS_NAME)
            # the weights get the config's mode (the umask's), not the writer's private 0600
            shutil.copymode(staging / CONFIG_NAME, staging / WEIGHTS_NAME)
            _replace_folder(staging, path)
        except BaseException:
            _discard(staging)
            raise
        return given

    @classmethod
    def from_pretrained(cls, path, *, device=None) -> "DecoderLM":
        """Load a folder written by :meth:`save_pretrained` (in the dtype it was saved in)
        onto ``device`` (default CPU)."""
        from safetensors.torch import load_model

        path = Path(path)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_file.exists():
            raise ValueError(f"{path} has no {CONFIG_NAME}; expected a folder written by DecoderLM.save_pretrained")
        if not weights_file.exists():
            raise ValueError(f"{path} has no {WEIGHTS_NAME}; expected a folder written by DecoderLM.save_pretrained")
        try:
            device = torch.device(device or "cpu")
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r} ({err})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} asked for, but no CUDA device is available; use device='cpu'")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_file} is not valid JSON ({err}); expected the config written by "
                             "DecoderLM.save_pretrained") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object of DecoderLM arguments, got {type(config).__name__}")
        dtype, overrides = _read_dtype_fields(config, config_file)
        try:
            model = cls(**config)
        except TypeError as err:
            raise ValueError(f"{config_file} does not match DecoderLM's arguments: {err}") from None
        model.to(device=device, dtype=dtype)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        overrides = {_legacy_name(model, name): tensor_dtype for name, tensor_dtype in overrides.items()}
        for name, tensor_dtype in overrides.items():
            if name not in tensors:
                raise ValueError(f"{config_file}: dtype_overrides names {name!r}, which the model does not have")
            tensors[name].data = tensors[name].data.to(tensor_dtype)
        try:
            load_model(model, str(weights_file), device=str(device))
        except Exception as err:  # noqa: BLE001 - safetensors' and torch's errors, named by file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{weights_file} cannot be loaded into the model that {config_file} describes: "
                             f"{type(err).__name__}: {first[:400]}") from None
        return model


# Checkpoints written before the model owned the shared modules (issue 21) kept MASA's dictionary
# in the first MASA layer, as ``layers.<i>.attn.atoms.*``; they load with those names moved to
# ``shared.<key>.*``, the layer's dictionary in ``model.shared``.
_LEGACY_SHARED = "attn.atoms."


def next_token(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """The next token ``[B, 1]`` from ``logits [B, V]``: greedy at ``temperature=0``, else sampled from
    ``softmax(logits / temperature)`` over the ``top_k`` most likely tokens (all when None)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits.float() / temperature
    if top_k is not None:
        kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)


def _legacy_prefixes(model: "DecoderLM") -> dict[str, str]:
    """``{old prefix: new prefix}`` for the layers that use one of ``model.shared``'s modules."""
    return {f"layers.{i}.{_LEGACY_SHARED}": f"shared.{block.attn.shared_key}."
            for i, block in enumerate(model.layers) if getattr(block.attn, "shared_key", None)}


def _legacy_name(model: "DecoderLM", name: str) -> str:
    for old, new in _legacy_prefixes(model).items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _rename_legacy_keys(model, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: an old checkpoint's names for the shared modules, renamed in
    place (a key already under its new name wins)."""
    for old, new in _legacy_prefixes(model).items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            value = state_dict.pop(key)
            state_dict.setdefault(prefix + new + key[len(prefix + old):], value)


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _dtype_fields(model: nn.Module) -> dict:
    """``{"dtype": ..., "dtype_overrides": {name: dtype}}``: the dtype of most floating
    parameters and buffers, and the names of those in another (e.g. fp32 norms in a bf16 model)."""
    tensors = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
    names = [str(t.dtype).removeprefix("torch.") for t in tensors.values()]
    main = max(set(names), key=names.count) if names else "float32"
    overrides = {n: d for n, d in zip(tensors, names) if d != main}
    return {"dtype": main, **({"dtype_overrides": overrides} if overrides else {})}


def _read_dtype_fields(config: dict, config_file: Path):
    """Pop the dtype fields from a loaded config: ``(dtype, {name: dtype})``; float32 for old
    checkpoints that have none."""
    def parse(value, where):
        if value not in _DTYPES:
            raise ValueError(f"{config_file}: {where} must be one of {', '.join(_DTYPES)}, got {value!r}")
        return _DTYPES[value]

    dtype = parse(config.pop("dtype", "float32"), "dtype")
    overrides = config.pop("dtype_overrides", {})
    if not isinstance(overrides, dict):
        raise ValueError(f"{config_file}: dtype_overrides must map tensor names to dtypes, got {overrides!r}")
    return dtype, {name: parse(value, f"dtype_overrides[{name!r}]") for name, value in overrides.items()}


def _write_weights(model: nn.Module, file: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(file))


def _discard(staging: Path) -> None:
    """Remove a staging folder after a failed save: our files only, so that anything else in it
    (an existing folder's other files, had putting them back failed) stays for the user."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (staging / name).unlink(missing_ok=True)
    try:
        staging.rmdir()
    except OSError:
        pass


def _replace_folder(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` folder to ``path``. An existing ``path`` keeps its other
    files (moved into the new folder) and is removed only after the new one is in place."""
    if not path.exists():
        os.rename(staging, path)
        return
    ours = {CONFIG_NAME, WEIGHTS_NAME}
    moved, old = [], None
    try:
        for entry in path.iterdir():
            if entry.name not in ours:
                os.rename(entry, staging / entry.name)
                moved.append(entry.name)
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / path.name)  # same filesystem: both renames are atomic
    except BaseException:
        if old is not None:
            old.rmdir()
        for name in moved:  # put the other files back: the old checkpoint stays whole
            os.rename(staging / name, path / name)
        raise
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(old / path.name, path)
        old.rmdir()
        for name in moved:
            os.rename(staging / name, path / name)
        raise
    shutil.rmtree(old, ignore_errors=True)
