"""DecoderLM: decode == full forward, generate through the state, save/load, per-layer mechanisms."""

import pytest
import torch

from attnkit.models import DecoderLM


def small_model(**kwargs):
    torch.manual_seed(0)
    defaults = dict(vocab_size=50, dim=32, num_layers=2, num_heads=4, attention="gqa")
    defaults.update(kwargs)
    return DecoderLM(**defaults).double()


def test_decode_equals_full_forward():
    model = small_model(attention=["mha", "mqa"])
    tokens = torch.randint(0, 50, (2, 11))
    full = model(tokens)
    state = model.init_state(2)
    steps = [model(tokens[:, :4], state)] + [model(tokens[:, i : i + 1], state) for i in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = small_model()
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :5], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


def test_sampling_is_seeded():
    model = small_model()
    prompt = torch.randint(0, 50, (1, 3))
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_save_and_load_roundtrip(tmp_path):
    model = small_model(attention=["mha", "gqa"], attention_options={"qk_norm": True})
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt").double()
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert loaded.config == model.config
    assert loaded.embed.weight.data_ptr() != 0


def test_packed_training_batch_equals_separate():
    model = small_model()
    a, b = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 4))
    ids = torch.tensor([[0] * 6 + [1] * 4])
    packed = model(torch.cat([a, b], 1), document_ids=ids)
    torch.testing.assert_close(packed, torch.cat([model(a), model(b)], 1))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_layers=2"):
        DecoderLM(vocab_size=10, dim=32, num_layers=2, num_heads=4, attention=["mha"])
    with pytest.raises(ValueError, match="unknown mechanism"):
        DecoderLM(vocab_size=10, dim=32, num_layers=1, num_heads=4, attention="nope")
    model = small_model()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="init_state"):
        model(torch.randint(0, 50, (1, 3)), state=[None])
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)
    with pytest.raises(ValueError, match="init_state"):  # a state built for another batch size
        model(torch.randint(0, 50, (2, 3)), state=model.init_state(3))
    with pytest.raises(ValueError, match="B=0"):
        model(torch.randint(0, 50, (0, 3)))


def test_loss_only_where_supervised():
    """loss() runs the output layer on the supervised positions only: the same value and
    gradients as cross-entropy over the full logits with ignore_index=-100."""
    import torch.nn.functional as F

    model = small_model()
    tokens = torch.randint(0, 50, (3, 9))
    targets = torch.full((3, 9), -100)
    targets[0, 2], targets[1, 5], targets[2, 8], targets[2, 0] = 7, 11, 3, 49
    loss = model.loss(tokens, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    full = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, full)
    for got, want in zip(grads, torch.autograd.grad(full, list(model.parameters()))):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="targets"):
        model.loss(tokens, targets[:, :4])


# -- persistence: atomic saves, dtype, clear errors ---------------------------------------------
def test_failed_save_over_a_checkpoint_leaves_it_loadable(tmp_path, monkeypatch):
    """The weight writer fails halfway (a full disk): the checkpoint already there still loads
    and equals the model that wrote it, and no temporary folder is left behind."""
    from attnkit.models import decoder

    old = small_model(dim=32)
    old.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "README.md").write_text("model card")

    def fail_halfway(model, file):
        file.write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(decoder, "_write_weights", fail_halfway)
    new = small_model(dim=64, num_heads=8)  # another shape: the old weights would not load under its config
    with pytest.raises(OSError, match="No space"):
        new.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == old.config
    for (name, a), b in zip(old.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "README.md").read_text() == "model card"


def test_saved_folder_has_the_usual_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        small_model().save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    (tmp_path / "ckpt").chmod(0o750)
    small_model().save_pretrained(tmp_path / "ckpt")  # over an existing folder: its mode is kept
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o750


def test_save_over_a_checkpoint_replaces_it_and_keeps_other_files(tmp_path):
    small_model(dim=32).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("kept")
    new = small_model(dim=64, num_heads=8)
    new.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == new.config
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_under_a_file_size_limit_keeps_the_old_checkpoint(tmp_path):
    """A real short write: RLIMIT_FSIZE below the weights' size, in a child process."""
    import subprocess
    import sys
    import textwrap

    resource = pytest.importorskip("resource")
    old = small_model(dim=32)
    old.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from attnkit.models import DecoderLM
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write raises instead of killing
        model = DecoderLM(vocab_size=50, dim=64, num_layers=2, num_heads=8, attention="gqa")
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        try:
            model.save_pretrained({str(tmp_path / "ckpt")!r})
        except Exception as err:  # safetensors raises its own SafetensorError
            print("failed:", err)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "failed:" in run.stdout, run.stdout + run.stderr
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == old.config
    torch.testing.assert_close(loaded.embed.weight, old.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_save_and_load_keep_the_dtype(tmp_path, dtype):
    model = small_model().to(dtype)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt")
    assert all(p.dtype == dtype for p in loaded.parameters())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_save_and_load_keep_mixed_dtypes(tmp_path):
    model = small_model().to(torch.bfloat16)
    model.norm.float()  # a float32 final norm in a bfloat16 model
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.norm.weight.dtype == torch.float32 and loaded.embed.weight.dtype == torch.bfloat16


def test_from_pretrained_bad_folders(tmp_path):
    small_model().save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    text = config.read_text()
    for bad, match in (("", "config.json is not valid JSON"), ("{nope", "config.json is not valid JSON"),
                       ("[1, 2]", "config.json must hold a JSON object"),
                       ('{"dim": 32, "widht": 3}', "config.json does not match"),
                       (text.replace('"float64"', '"float7"'), "dtype must be one of")):
        config.write_text(bad)
        with pytest.raises(ValueError, match=match):
            DecoderLM.from_pretrained(tmp_path / "ckpt")
    config.write_text(text)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            DecoderLM.from_pretrained(tmp_path / "ckpt", device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        DecoderLM.from_pretrained(tmp_path / "ckpt", device="gpu0")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        DecoderLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="has no config.json"):
        DecoderLM.from_pretrained(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        small_model().save_pretrained(tmp_path / "file")


@pytest.mark.cuda
def test_cuda_load_onto_the_gpu_in_the_saved_dtype(tmp_path):
    model = small_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt", device="cuda")
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in loaded.parameters())
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(tokens.cuda()).float().cpu(), model(tokens).float(), atol=2e-2, rtol=2e-2)


def test_a_failed_swap_puts_the_old_checkpoint_and_its_files_back(tmp_path, monkeypatch):
    """The last rename (new folder into place) fails: the old folder and its other files return."""
    import os

    from attnkit.models import decoder

    old = small_model(dim=32)
    old.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("kept")
    rename = os.rename

    def failing_rename(src, dst):
        if ".saving-" in str(src) and str(dst) == str(tmp_path / "ckpt"):
            raise OSError("simulated failure")
        return rename(src, dst)

    monkeypatch.setattr(decoder.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        small_model(dim=64, num_heads=8).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert DecoderLM.from_pretrained(tmp_path / "ckpt").config == old.config
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_edge_paths_and_modes(tmp_path, monkeypatch):
    """The probe's cases: the weights get the usual file mode (not 0600); "." (the folder the process
    runs in) is refused clearly instead of failing mid-swap; a symlinked checkpoint folder is written
    through (the link stays, the user's other files stay in its target)."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        small_model().save_pretrained(tmp_path / "ckpt")
        assert stat.S_IMODE((tmp_path / "ckpt" / "model.safetensors").stat().st_mode) == 0o644
        (tmp_path / "here").mkdir()
        monkeypatch.chdir(tmp_path / "here")
        for folder in (".", "", ".."):  # the swap would leave the process in a replaced folder
            with pytest.raises(ValueError, match="would replace the folder this process runs in"):
                small_model().save_pretrained(folder)
        small_model().save_pretrained("sub")
        DecoderLM.from_pretrained("sub")
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "README.txt").write_text("mine")
        (tmp_path / "link").symlink_to(tmp_path / "real")
        model = small_model()
        model.save_pretrained(tmp_path / "link")
    finally:
        os.umask(umask)
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "README.txt").read_text() == "mine"
    loaded = DecoderLM.from_pretrained(tmp_path / "link")
    tokens = torch.randint(0, 50, (1, 6))
    torch.testing.assert_close(loaded(tokens), model(tokens))


def test_from_pretrained_names_the_file_when_weights_do_not_fit(tmp_path):
    import json

    small_model().save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "dim": 64}))
    with pytest.raises(ValueError, match="model.safetensors cannot be loaded"):
        DecoderLM.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors cannot be loaded"):
        DecoderLM.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_init_state_checks_its_batch_size(batch_size):
    import attnkit

    for name in ("mha", "lightning", "cca", "rcmha", "streaming"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            attnkit.build(name, dim=32, num_heads=4).init_state(batch_size)
