"""Modules shared by a model's layers (MASA's dictionary) belong to the model: checkpoints from
before that load (their keys renamed), and wrapping each block as its own FSDP unit, which
breaks a module that one block owns and another reads, leaves the model's output and
gradients as they were."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from attnkit.models import DecoderLM

OLD_CHECKPOINT = Path(__file__).parent / "data" / "masa_before_issue21"


def _expected():
    data = json.loads((OLD_CHECKPOINT / "expected.json").read_text())
    return torch.tensor(data["tokens"]), torch.tensor(data["logits"])


def test_checkpoint_from_before_the_model_owned_the_dictionary_loads(tmp_path):
    """Written by the earlier code (layers ["mha", "masa", "masa"], the dictionary saved as
    ``layers.1.attn.atoms.*``): it loads into ``shared.masa.*`` and gives the logits it gave."""
    tokens, logits = _expected()
    model = DecoderLM.from_pretrained(OLD_CHECKPOINT)
    torch.testing.assert_close(model(tokens), logits)
    # saved again, it has the new names only, and round-trips
    model.save_pretrained(tmp_path / "new")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"shared.masa.q", "shared.masa.o"} <= keys and not any("atoms" in k for k in keys)
    torch.testing.assert_close(DecoderLM.from_pretrained(tmp_path / "new")(tokens), logits)


def test_old_names_load_through_load_state_dict_too():
    model = DecoderLM.from_pretrained(OLD_CHECKPOINT)
    old = {k.replace("shared.masa.", "layers.1.attn.atoms."): v.clone() for k, v in model.state_dict().items()}
    config = json.loads((OLD_CHECKPOINT / "config.json").read_text())
    config.pop("dtype")
    fresh = DecoderLM(**config)
    assert not torch.equal(fresh.shared["masa"].q, model.shared["masa"].q)
    fresh.load_state_dict(old)  # strict: every old name found its place
    tokens, logits = _expected()
    torch.testing.assert_close(fresh(tokens), logits)


def test_old_dtype_override_names_are_renamed(tmp_path):
    """A config that records a dtype for the dictionary under its old name still loads."""
    folder = tmp_path / "old"
    shutil.copytree(OLD_CHECKPOINT, folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype_overrides"] = {"layers.1.attn.atoms.q": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    tokens, logits = _expected()
    torch.testing.assert_close(DecoderLM.from_pretrained(folder)(tokens), logits)


# -- FSDP, one unit per block ------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DecoderLM(vocab_size=64, dim=32, num_layers=4, num_heads=4, attention="masa")
        tokens = torch.randint(0, 64, (2, 8))
        mesh = init_device_mesh("cpu", (world,))
        for block in model.layers:  # the usual per-block wrapping; the shared modules stay with the root
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        loss = model(tokens).square().mean()
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_per_block_wrapping_keeps_the_shared_dictionary(tmp_path):
    """Two gloo processes on CPU, each block its own FSDP unit: the loss and every gradient
    (the shared atoms' included) match the unwrapped model. With the dictionary inside block 0
    (the earlier layout) block 0's unit reshards it after running, and block 1 fails on it."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard)")
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=64, dim=32, num_layers=4, num_heads=4, attention="masa")
    tokens = torch.randint(0, 64, (2, 8))
    loss = model(tokens).square().mean()
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach())
        assert set(got["grads"]) == {n for n, _ in model.named_parameters()}
        assert "shared.masa.q" in got["grads"]
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, msg=name)
