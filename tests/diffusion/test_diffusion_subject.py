"""attnkit.diffusion.subject at the tiny preset on CPU: FLUX's layout, rectified-flow training that
learns, save/load, deterministic sampling, the train command and bad inputs.

(Named test_diffusion_subject.py: tests/hf/test_subject.py holds the basename test_subject.py, and
pytest's default import mode refuses two test modules of one basename.)"""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from attnkit.diffusion import scenes as S  # noqa: E402
from attnkit.diffusion import subject as M  # noqa: E402


def _tiny(seed=0):
    torch.manual_seed(seed)
    return M.SubjectModel(M.SubjectConfig(**M.PRESETS["tiny"]["model"])).eval()


def test_pack_unpack_and_image_ids_are_fluxs():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    images = torch.randn(2, 3, 8, 12)
    tokens = M.SubjectModel.pack(images)
    assert tokens.shape == (2, 4 * 6, 12)
    assert torch.equal(tokens, FluxPipeline._pack_latents(images, 2, 3, 8, 12))
    assert torch.equal(M.SubjectModel.unpack(tokens, 8, 12), images)
    assert torch.equal(M.SubjectModel.unpack(tokens, 8, 12), FluxPipeline._unpack_latents(tokens, 8, 12, 1))
    ids = M.SubjectModel.image_ids(4, 6)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 1.0]  # (0, row, col), row-major
    # a token is a 2x2 patch: token (row 1, col 2) holds pixels rows 2-3, columns 4-5, channel-major
    assert torch.equal(tokens[0, 1 * 6 + 2].view(3, 2, 2), images[0, :, 2:4, 4:6])


def test_default_preset_is_the_documented_size():
    config = M.SubjectConfig(**M.PRESETS["default"]["model"])
    assert config.image_size == 32 and sum(config.axes_dims_rope) == config.attention_head_dim
    with torch.device("meta"):  # counts the parameters without allocating them
        model = M.SubjectModel(config)
    n = model.parameter_count()
    assert n == 4_131_516 and n * 4 <= 20e6  # 16.5 MB in float32


def test_training_lowers_the_loss_on_a_fixed_batch():
    model = _tiny().train()
    g = torch.Generator().manual_seed(0)
    batch = S.sample_scenes(8, g)
    images, captions = S.render_batch(batch, 8)["image"], S.caption_batch(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        # the same noise and times every step: the objective is fixed, so the loss must fall
        loss = M.rf_loss(model, images, captions, torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_forward_is_flux_with_t_in_0_1_and_the_caption_encoder():
    model = _tiny()
    x = torch.randn(3, 16, 12)
    ids = torch.stack([S.encode_caption(c) for c in ("dots", "stripes large red circle top-left", "")])
    hidden, pooled = model.encode(ids)
    direct = model.transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                               timestep=torch.full((3,), 0.25), img_ids=model.image_ids(4, 4),
                               txt_ids=torch.zeros(S.CAPTION_LENGTH, 3), return_dict=False)[0]
    with torch.no_grad():
        assert torch.equal(model(x, 0.25, ids), direct.detach())
        assert torch.equal(model(x, torch.tensor(0.25), ids), direct.detach())
        assert torch.equal(model.velocity(x, 0.25, ids), direct.detach())
        # strings and ids are one caption; the caption changes the velocity
        assert torch.equal(model(x, 0.25, ["dots", "stripes large red circle top-left", ""]), model(x, 0.25, ids))
        assert not torch.allclose(model(x, 0.25, ids[[1, 1, 1]]), model(x, 0.25, ids))


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _tiny(seed=3)
    M.save(model, tmp_path / "m", {"note": "test"})
    again = M.load(tmp_path / "m")
    x = torch.randn(2, 16, 12)
    with torch.no_grad():
        assert torch.equal(model(x, 0.7, ["dots", "checks"]), again(x, 0.7, ["dots", "checks"]))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["training"] == {"note": "test"} and config["vocab"] == list(S.VOCAB)
    assert not list((tmp_path / "m").glob(".*.tmp"))  # the atomic writes left no partial files


def test_sample_shapes_determinism_guidance_and_the_euler_step():
    model = _tiny()
    captions = ["dots large red circle centre", "stripes"]
    a = M.sample(model, captions, seed=5, steps=3)
    assert a.shape == (2, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, M.sample(model, captions, seed=5, steps=3))
    assert not torch.equal(a, M.sample(model, captions, seed=6, steps=3))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, M.sample(model, captions, noise=noise, steps=3))
    # one Euler step from t = 1 to 0: x0 = noise - v(noise, 1), clamped to [-1, 1]
    with torch.no_grad():
        v = model(model.pack(noise), 1.0, captions)
    one = M.sample(model, captions, noise=noise, steps=1)
    assert torch.allclose(one, model.unpack(model.pack(noise) - v, 8, 8).clamp(-1, 1), atol=1e-6)
    # guidance: v_u + g (v_c - v_u), the unconditional caption all padding
    x = model.pack(noise)
    with torch.no_grad():
        guided = M.velocity_fn(model, captions, guidance=3.0)(x, torch.tensor([0.4, 0.6]))
        cond = model(x, torch.tensor([0.4, 0.6]), captions)
        uncond = model(x, torch.tensor([0.4, 0.6]), ["", ""])
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert M.sample(model, captions, seed=5, steps=2, guidance=2.0).shape == (2, 3, 8, 8)


def test_train_command_writes_the_folder(tmp_path, capsys):
    out = tmp_path / "subject"
    assert M.main(["train", "--out", str(out), "--preset", "tiny", "--steps", "12", "--device", "cpu",
                   "--lr", "0.002"]) == 0
    for name in ("config.json", "model.safetensors", "samples.png", "train.log", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "config.json").read_text())["training"]
    assert record["steps"] == 12 and record["preset"] == "tiny" and record["train"]["lr"] == 0.002
    log = (out / "train.log").read_text().splitlines()
    assert [line.split()[0] for line in log if not line.startswith("#")] == ["10", "12"]
    assert "final loss" in (out / "README.md").read_text() and "step 10/12" in capsys.readouterr().out
    model = M.load(out)
    assert M.sample(model, ["dots"], seed=0, steps=2).shape == (1, 3, 8, 8)
    assert M.main(["sample", "--model", str(out), "--caption", "dots", "--caption", "rings small",
                   "--seeds", "2", "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    # a time budget stops the run: 1e-6 minutes allows the first step only
    record = M.train(tmp_path / "timed", preset="tiny", minutes=1e-6, progress=lambda line: None)
    assert record["steps"] == 1


def test_the_saved_weights_are_the_ema_when_the_preset_keeps_one(tmp_path):
    quiet = dict(preset="tiny", steps=6, progress=lambda line: None)
    M.train(tmp_path / "plain", options={"ema": 0.0}, **quiet)
    M.train(tmp_path / "ema", options={"ema": 0.5}, save_every_s=0.0, **quiet)
    plain, ema = (M.load(tmp_path / name).state_dict() for name in ("plain", "ema"))
    # the EMA lags the weights: it lies between the initial and the final ones, so it differs from the final
    torch.manual_seed(0)
    init = M.SubjectModel(M.SubjectConfig(**M.PRESETS["tiny"]["model"])).state_dict()
    moved = lambda state: sum(float((state[k] - init[k]).norm()) for k in init)
    assert 0 < moved(ema) < moved(plain)
    assert "EMA (decay 0.5)" in (tmp_path / "ema" / "README.md").read_text()


def test_png_writer_round_trips_through_a_png_reader(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    picture = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    M.write_png(tmp_path / "p.png", picture)
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png").convert("RGB")), picture.numpy())


def test_bad_inputs_raise_value_errors_naming_the_argument(tmp_path):
    model = _tiny()
    x = torch.randn(1, 16, 12)
    cases = [
        (lambda: M.SubjectModel.pack(torch.randn(1, 3, 7, 8)), "H and W even"),
        (lambda: M.SubjectModel.unpack(torch.randn(1, 16, 12), 8, 6), "do not unpack to 8x6"),
        (lambda: M.SubjectConfig(image_size=12), "size must be a positive multiple of 8"),
        (lambda: M.SubjectConfig(attention_head_dim=40, axes_dims_rope=(8, 16, 14)), "summing to attention_head_dim"),
        (lambda: M.SubjectConfig(num_attention_heads=0), "num_attention_heads must be an int >= 1"),
        (lambda: M.SubjectConfig(num_layers=0, num_single_layers=0), "must be >= 1"),
        (lambda: M.SubjectConfig.from_dict({"image_size": 8, "depth": 3}), "unknown subject config keys"),
        (lambda: model(x, 0.5, ["dots purple"]), "unknown ['purple']"),
        (lambda: model(x, 0.5, "dots"), "non-empty list of strings"),
        (lambda: model(x, 0.5, torch.zeros(1, 4, dtype=torch.long)), "LongTensor (B, 10)"),
        (lambda: model(x, 0.5, torch.full((1, 10), 99)), "caption ids must lie in"),
        (lambda: model(x, 1.5, ["dots"]), "t must lie in [0, 1]"),
        (lambda: model(x, torch.ones(3), ["dots"]), "t must be a float or a tensor"),
        (lambda: model(torch.randn(1, 9, 12), 0.5, ["dots"]), "tokens must be (B, 16, 12)"),
        (lambda: model(x, 0.5, ["dots", "rings"]), "with one caption each"),
        (lambda: M.sample(model, ["dots"], steps=0), "steps must be an int >= 1"),
        (lambda: M.sample(model, ["dots"], guidance=float("nan")), "guidance must be a finite number"),
        (lambda: M.sample(model, ["dots"], noise=torch.randn(1, 3, 16, 16)), "noise must be (1, 3, 8, 8)"),
        (lambda: M.train(tmp_path, preset="huge"), "preset must be one of"),
        (lambda: M.train(tmp_path, preset="tiny", steps=0), "steps must be an int >= 1"),
        (lambda: M.train(tmp_path, preset="tiny", minutes=0), "minutes must be > 0"),
        (lambda: M.train(tmp_path, preset="tiny", batch_size=0), "batch_size must be an int >= 1"),
        (lambda: M.train(tmp_path, preset="tiny", options={"learning_rate": 1.0}), "options must name"),
        (lambda: M.write_png(tmp_path / "x.png", torch.zeros(4, 4)), "picture must be uint8"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert message in str(err.value), (message, str(err.value))
    with pytest.raises(FileNotFoundError, match="holds no subject"):
        M.load(tmp_path / "nothing")
    assert M.main(["train", "--out", str(tmp_path / "t"), "--preset", "tiny", "--steps", "0"]) == 2


@pytest.mark.cuda
def test_on_cuda_the_data_never_waits_for_the_device_and_training_runs_in_bf16(tmp_path):
    # the training loop renders every batch on the GPU: a host-device sync there would stall it each step
    g = torch.Generator(device="cuda").manual_seed(0)
    S.render_batch(S.sample_scenes(4, g), 32)  # the first call builds the per-device tables (a copy each)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = S.sample_scenes(256, g)
        images = S.render_batch(batch, 32)["image"]
        captions = S.caption_batch(batch, 0.15, 0.1, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and captions.is_cuda and images.shape == (256, 3, 32, 32)
    record = M.train(tmp_path / "cuda", preset="tiny", steps=20, device="cuda", progress=lambda line: None)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in record["curve"])
    model = M.load(tmp_path / "cuda", "cuda")
    on_gpu = M.sample(model, ["dots"], seed=0, steps=3)
    on_cpu = M.sample(M.load(tmp_path / "cuda"), ["dots"], seed=0, steps=3)
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-3)  # one seed, the same images on either device


def test_a_loss_that_turns_nan_stops_training_and_says_where(tmp_path, monkeypatch):
    # the H200 run of the CUDA test saw a non-finite loss; training must stop with the clues, not go on
    real = M.rf_loss
    calls = []

    def broken(model, images, captions, generator):
        calls.append(1)
        return real(model, images, captions, generator) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(M, "rf_loss", broken)
    with pytest.raises(FloatingPointError, match=r"the training loss is nan by step 10: images finite: True; "
                                                 r"captions in range: True; weights finite: (True|False); loss in"):
        M.train(tmp_path / "nan", preset="tiny", steps=20, device="cpu", progress=lambda line: None)


def test_the_shipped_subject_draws_what_its_caption_says_as_the_shipped_probe_reads_it():
    # the H200-trained subject and probe travel with the package: a caption's attributes come back
    from attnkit.diffusion import probe as P
    from attnkit.diffusion.scenes import COLOURS, STYLES

    model, probe = M.load(), P.load()
    captions = ["stripes large red circle top-left", "checks small blue square centre"]
    images = torch.cat([M.sample(model, captions, seed=s, steps=12, guidance=2.0) for s in range(2)])
    read = P.read(probe, images)
    assert [STYLES[i] for i in read["style"]] == ["stripes", "checks"] * 2
    assert [COLOURS[i] for i in read["colour"]] == ["red", "blue"] * 2
    assert read["centre"][0::2, 0].max() < 0.35 and (read["centre"][1::2] - 0.5).abs().max() < 0.15
