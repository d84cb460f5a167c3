"""IDOL: the cross-modal attention and both consistency losses against float64 references written
out (forward and gradients), the identities that hold (identical streams give zero losses, a
duplicated stream does not move the cross-modal attention), the modality label steering, the
stock attention kept bit for bit under the map recorder, a few training steps lowering the loss,
and bad input."""

from __future__ import annotations

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from attnkit.diffusion import idol  # noqa: E402
from attnkit.diffusion.subject import SubjectConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = SubjectConfig(**idol.PRESETS["tiny"]["model"])


def tiny_model(seed=0, frames=2, dtype=torch.float32):
    torch.manual_seed(seed)
    model = idol.IDOLModel(TINY, frames)
    with torch.no_grad():  # the output projections start at zero: give them weights so they act
        for m in model.cross_modal:
            m.to_out.weight.normal_(std=0.2)
            m.to_out.bias.normal_(std=0.1)
    return model.to(dtype).eval()


def tokens(batch=2, frames=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = (TINY.image_size // 2) ** 2
    return (torch.randn(batch, frames, n, 12, generator=g, dtype=dtype),
            torch.randn(batch, frames, n, 12, generator=g, dtype=dtype))


def rope_for(model, frames, dtype):
    cos, sin = model.subject.transformer.pos_embed(model.image_ids(frames))
    return cos.to(dtype), sin.to(dtype)


# -- references ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_rope", [False, True])
def test_cross_modal_attention_matches_the_float64_reference_forward_and_gradients(with_rope):
    torch.manual_seed(0)
    module = idol.CrossModalAttention(32, 2).double()
    with torch.no_grad():
        module.to_out.weight.normal_(std=0.3)
    model = tiny_model(dtype=torch.float64)
    rope = rope_for(model, 2, torch.float64) if with_rope else None
    h = torch.randn(4, 2 * 16, 32, dtype=torch.float64, requires_grad=True)  # 2 clips, 2 frames of 16 tokens
    out = module(h, rope)
    ref = idol.cross_modal_reference(module, h, rope)
    # diffusers' apply_rotary_emb (FLUX's own RoPE, used by the fast path) rotates in float32
    tol = dict(rtol=1e-5, atol=1e-6) if with_rope else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    w = torch.randn_like(out)
    g_fast = torch.autograd.grad((out * w).sum(), [h, module.to_q.weight, module.to_k.weight, module.to_v.weight])
    g_ref = torch.autograd.grad((ref * w).sum(), [h, module.to_q.weight, module.to_k.weight, module.to_v.weight])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **tol)


def test_cross_modal_attention_float32_fast_path_is_close_to_the_reference():
    torch.manual_seed(0)
    module = idol.CrossModalAttention(32, 2)
    with torch.no_grad():
        module.to_out.weight.normal_(std=0.3)
    h = torch.randn(4, 24, 32)
    torch.testing.assert_close(module(h).double(), idol.cross_modal_reference(module, h), rtol=1e-4, atol=1e-5)


def test_motion_field_matches_the_float64_reference_forward_and_gradients():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, 16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    fast = idol.motion_field(f, (4, 4), 0.5)
    ref = idol.motion_field_reference(f, (4, 4), 0.5)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(fast)
    ga, = torch.autograd.grad((fast * w).sum(), f)
    gb, = torch.autograd.grad((ref * w).sum(), f)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)
    loss = idol.motion_consistency([f, f.flip(0)], (4, 4), 0.5)
    loss_ref = idol.motion_consistency_reference([f, f.flip(0)], (4, 4), 0.5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
    ga, = torch.autograd.grad(loss, f)
    gb, = torch.autograd.grad(loss_ref, f)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)


def test_motion_field_reads_a_known_shift():
    # one-hot features per position, shifted one token right from frame 0 to frame 1: at a low
    # temperature the field is (1 / w, 0) wherever the shifted token stays inside the grid
    h = w = 4
    eye = torch.eye(h * w, dtype=torch.float64).view(h, w, h * w) * 8
    frame1 = torch.zeros_like(eye)
    frame1[:, 1:] = eye[:, :-1]
    frame1[:, 0] = -eye[:, -1]  # unmatched
    f = torch.stack([eye.reshape(h * w, -1), frame1.reshape(h * w, -1)])[None]
    field = idol.motion_field(f, (h, w), temperature=0.05)[0, 0].view(h, w, 2)
    torch.testing.assert_close(field[:, :-1, 0], torch.full((h, w - 1), 1 / w, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(field[:, :-1, 1], torch.zeros(h, w - 1, dtype=torch.float64), atol=1e-6, rtol=0)


def test_xattn_consistency_matches_the_float64_reference_forward_and_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = 8 ** -0.5
    fast = idol.xattn_consistency([idol.xattn_maps(q, k, scale)])
    ref = idol.xattn_consistency_reference([q], [k], scale)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-14)
    for a, b in zip(torch.autograd.grad(fast, [q, k]), torch.autograd.grad(ref, [q, k])):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-14)


# -- identities -------------------------------------------------------------------------------------------


def test_losses_are_zero_when_the_two_streams_are_identical():
    # identical token streams under one modality label: the shared model computes the same
    # features and maps for both rows of a clip, so both consistency losses vanish
    model = tiny_model(dtype=torch.float64)
    v, _ = tokens(dtype=torch.float64)
    _, _, aux = model(v, v, 0.5, ["dots", "large red circle"], modalities=("video", "video"), record=True)
    assert aux["features"] and aux["maps"]
    assert idol.motion_consistency(aux["features"], model.grid).item() == 0.0
    assert idol.xattn_consistency(aux["maps"]).item() == 0.0
    # and they do not vanish for the two real labels
    _, _, aux = model(v, v, 0.5, ["dots", "large red circle"], record=True)
    assert idol.motion_consistency(aux["features"], model.grid).item() > 0
    assert idol.xattn_consistency(aux["maps"]).item() > 0


def test_a_partner_identical_to_its_stream_attends_as_self_attention():
    # keys [x; x] put the same weight on both copies of each token: the same as attending to x
    torch.manual_seed(0)
    module = idol.CrossModalAttention(32, 2).double()
    with torch.no_grad():
        module.to_out.weight.normal_(std=0.3)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    out = module(torch.cat([x, x]))
    q = module.to_q(module.norm(x)).view(2, 12, 2, 16).transpose(1, 2)
    k = module.to_k(module.norm(x)).view(2, 12, 2, 16).transpose(1, 2)
    v = module.to_v(module.norm(x)).view(2, 12, 2, 16).transpose(1, 2)
    self_attn = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
    expected = module.to_out(self_attn.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, torch.cat([expected, expected]), rtol=1e-10, atol=1e-12)


def test_the_modality_label_steers_the_output():
    model = tiny_model()
    v, d = tokens()
    with torch.no_grad():
        a = model(v, d, 0.5, ["dots", "rings"])
        b = model(v, d, 0.5, ["dots", "rings"], modalities=("depth", "video"))
        c = model(v, d, 0.5, ["dots", "rings"], modalities=("video", "video"))
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert not torch.allclose(a[1], c[1])


def test_without_cross_modal_attention_each_stream_is_the_subject_with_its_label():
    # cross_modal=False: no information flows between the streams, so changing the depth stream
    # leaves the video velocity untouched; with it, it does not
    model = tiny_model()
    v, d = tokens()
    d2 = d + 1.0
    with torch.no_grad():
        a = model(v, d, 0.5, ["dots", "rings"], cross_modal=False)[0]
        b = model(v, d2, 0.5, ["dots", "rings"], cross_modal=False)[0]
        c = model(v, d2, 0.5, ["dots", "rings"])[0]
        e = model(v, d, 0.5, ["dots", "rings"])[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(c, e)


def test_the_map_recorder_keeps_the_stock_attention_bit_for_bit():
    model = tiny_model()
    v, d = tokens()
    with torch.no_grad():
        plain = model(v, d, 0.3, ["dots", "rings"])
        recorded = model(v, d, 0.3, ["dots", "rings"], record=True)
    assert torch.equal(plain[0], recorded[0]) and torch.equal(plain[1], recorded[1])
    n_calls = TINY.num_layers + TINY.num_single_layers
    assert len(recorded[2]["maps"]) == n_calls and len(recorded[2]["features"]) == n_calls
    maps = recorded[2]["maps"][0]
    assert maps.shape == (4, TINY.num_attention_heads, 2 * 16, 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]))


def test_a_fresh_model_from_a_subject_starts_as_that_subject_on_each_stream():
    # zero-initialised cross-modal outputs: with the label embedding zeroed, each stream's velocity
    # is the subject's velocity of that stream (frames = 1, so the position ids are the subject's)
    torch.manual_seed(0)
    model = idol.IDOLModel(TINY, frames=1).eval()
    with torch.no_grad():
        model.modality.weight.zero_()
        v, d = tokens(frames=1)
        vv, vd = model(v, d, 0.4, ["dots", "rings"])
        sv = model.subject(v[:, 0], 0.4, ["dots", "rings"])
        sd = model.subject(d[:, 0], 0.4, ["dots", "rings"])
    torch.testing.assert_close(vv[:, 0], sv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vd[:, 0], sd, rtol=1e-5, atol=1e-5)


# -- training, sampling, agreement --------------------------------------------------------------------------


def test_a_few_training_steps_lower_the_loss_on_the_tiny_preset():
    model, record = idol.train_idol(None, preset="tiny", steps=30, seed=0, progress=lambda line: None)
    curve = record["curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert {"rf", "motion", "xattn"} <= set(curve[0])
    out = idol.sample(model, ["dots", ""], steps=2)
    assert out["video"].shape == (2, 2, 3, 8, 8) and out["depth"].shape == (2, 2, 1, 8, 8)
    assert torch.isfinite(out["video"]).all() and torch.isfinite(out["depth"]).all()


def test_training_without_the_consistency_losses_logs_the_rectified_flow_loss_only():
    _, record = idol.train_idol(None, preset="tiny", steps=2, options={"motion_weight": 0, "xattn_weight": 0},
                                progress=lambda line: None)
    assert set(record["curve"][-1]) == {"step", "loss", "rf"}


def test_agreement_on_rendered_clips_is_high_and_chance_is_low():
    g = torch.Generator().manual_seed(0)
    clips = idol.sample_clips(8, 3, 32, g)
    score = idol.agreement(clips["video"], clips["depth"])
    assert score["iou"] > 0.9 and score["centre_distance"] < 0.02 and score["chance_iou"] < 0.3
    torch.testing.assert_close(idol.image_to_depth(idol.depth_to_image(clips["depth"])), clips["depth"])


def test_denoised_agreement_scores_the_one_step_estimates():
    model = tiny_model()
    clips = idol.sample_clips(4, 2, 8, torch.Generator().manual_seed(0))
    score = idol.denoised_agreement(model, clips, 0.6, seed=1)
    assert score["frames"] == 8 and 0.0 <= score["iou"] <= 1.0


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    idol.save(model, tmp_path)
    again = idol.load(tmp_path)
    v, d = tokens()
    with torch.no_grad():
        a, b = model(v, d, 0.5, ["dots", "rings"]), again(v, d, 0.5, ["dots", "rings"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_training_into_a_folder_writes_weights_log_and_samples_that_load(tmp_path):
    model, record = idol.train_idol(tmp_path, preset="tiny", steps=2, save_every_s=0.0, progress=lambda line: None)
    assert {"config.json", "model.safetensors", "train.log", "samples.png"} <= {p.name for p in tmp_path.iterdir()}
    assert "step loss rf motion xattn" in (tmp_path / "train.log").read_text()
    again = idol.load(tmp_path)
    v, d = tokens()
    with torch.no_grad():
        a, b = model(v, d, 0.5, ["dots", "rings"]), again(v, d, 0.5, ["dots", "rings"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_recorder_on_its_own_keeps_a_flux_transformer_stock_and_records_its_maps():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.zeros(16), torch.arange(16.0) // 4, torch.arange(16.0) % 4], dim=1)
    inputs = dict(hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.full((2,), 0.5), img_ids=ids,
                  txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        stock = flux(**inputs)[0]
        recorder = idol.IDOLMaps()
        with ad.apply(flux, recorder):
            recorded = flux(**inputs)[0]
    assert torch.equal(stock, recorded)
    assert len(recorder.maps) == 2 and recorder.maps[0].shape == (2, 2, 16, 5)


def test_the_recorder_is_a_registered_method_with_a_card():
    assert ad.METHODS["idol"] is idol.IDOLMaps
    card = next(c for c in ad.CARDS if c.name == "idol")
    assert card.arxiv == "2407.10937" and card.layer is idol.IDOLMaps


# -- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_raises_value_errors_naming_the_argument():
    model = tiny_model()
    v, d = tokens()
    with pytest.raises(ValueError, match=r"modalities must name modalities among video, depth, got 'normal'"):
        model(v, d, 0.5, ["dots", "rings"], modalities=("video", "normal"))
    with pytest.raises(ValueError, match=r"modalities must be a pair"):
        model(v, d, 0.5, ["dots", "rings"], modalities="video")
    with pytest.raises(ValueError, match=r"video and depth must have the same shape .* video \(2, 2, 16, 12\) and "
                                         r"depth \(2, 1, 16, 12\)"):
        model(v, d[:, :1], 0.5, ["dots", "rings"])
    with pytest.raises(ValueError, match=r"video and depth must be \(B, F, 16, 12\)"):
        model(v[:, :, :8], d[:, :, :8], 0.5, ["dots", "rings"])
    with pytest.raises(ValueError, match=r"one caption per clip: 2 clips, got 1"):
        model(v, d, 0.5, ["dots"])
    with pytest.raises(ValueError, match=r"preset must be one of tiny, cpu, default, got 'huge'"):
        idol.train_idol(None, preset="huge")
    with pytest.raises(ValueError, match=r"options must name training settings among .*motion_weight.*got \['gamma'\]"):
        idol.train_idol(None, preset="tiny", options={"gamma": 1})
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got 0"):
        idol.train_idol(None, preset="tiny", steps=0)
    with pytest.raises(ValueError, match=r"features must be \(R, F, N, C\) with F >= 2"):
        idol.motion_field(torch.randn(2, 1, 16, 4), (4, 4))
    with pytest.raises(ValueError, match=r"grid must be a pair"):
        idol.motion_field(torch.randn(2, 2, 16, 4), 16)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        idol.motion_field(torch.randn(2, 2, 16, 4), (4, 4), temperature=0)
    with pytest.raises(ValueError, match=r"features must hold 2B rows"):
        idol.motion_consistency([torch.randn(3, 2, 16, 4)], (4, 4))
    with pytest.raises(ValueError, match=r"frames must be an int >= 1, got 0"):
        idol.IDOLModel(TINY, frames=0)
    with pytest.raises(ValueError, match=r"travel must lie in \[0, 0.6\]"):
        idol.sample_clips(2, 2, 8, torch.Generator(), travel=2.0)
    with pytest.raises(ValueError, match=r"video \(\.\.\., 3, H, W\) and depth \(\.\.\., 1, H, W\) must match"):
        idol.agreement(torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"steps must be an int >= 1"):
        idol.sample(model, ["dots"], steps=0)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\], got 0.0"):
        idol.denoised_agreement(model, idol.sample_clips(2, 2, 8, torch.Generator()), 0.0)


def test_the_command_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        idol.main(["train", "--out", "x", "--preset", "huge"])
    assert "invalid choice: 'huge'" in capsys.readouterr().err
