"""The denoiser interface, its diffusers adapters, CFG conventions and teacher loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import SCHEDULER_CONFIGS, tiny_cond_unet, tiny_dit, tiny_unet
from diffdistill.adapters import DiTDenoiser, UNet2DConditionDenoiser, UNet2DDenoiser, build_adapter
from diffdistill.analytic import GaussianMixture, GaussianMixtureDenoiser
from diffdistill.denoiser import Conditioning, standard_guidance_scale
from diffdistill.errors import DiffDistillError, ModelLoadError
from diffdistill.pretrained import load_pretrained, save_pipeline_dir
from diffdistill.schedules import VPSchedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_matches_diffusers_scheduler(prediction_type, randomize_weights):
    """Our x0 equals the ``pred_original_sample`` diffusers' DDPMScheduler computes from the same output."""
    cfg = {**SCHEDULER_CONFIGS["linear"], "prediction_type": prediction_type}
    unet = randomize_weights(tiny_unet())
    den = UNet2DDenoiser(unet, VPSchedule.from_scheduler_config(cfg), prediction_type)
    ddpm = DDPMScheduler(**cfg, clip_sample=False)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in [0, 250, 999]:
        with torch.no_grad():
            out = unet(x, t).sample
            ours = den(x, t)
        ref = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(0)).pred_original_sample
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_outputs_are_consistent_conversions(randomize_weights):
    den = UNet2DDenoiser(randomize_weights(tiny_unet()), VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]), "epsilon")
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 400.0, 800.0], dtype=torch.float64)
    with torch.no_grad():
        x0, eps, v, u = (den(x, t, output=k) for k in ("x0", "eps", "v", "flow"))
    a, s = (c[:, None, None, None] for c in den.schedule.alpha_sigma(t))
    torch.testing.assert_close(a * x0 + s * eps, x)
    torch.testing.assert_close(v, a * eps - s * x0)
    torch.testing.assert_close(u, eps - x0)


def test_cfg_standard_convention_on_analytic_teacher():
    gm = GaussianMixture.ring(4)
    sched = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    den = GaussianMixtureDenoiser(gm, sched)
    x = torch.randn(6, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    t = 300.0
    cond_x0 = den(x, t, Conditioning(class_labels=labels))
    uncond_x0 = den(x, t)
    for w in [0.0, 1.0, 2.5]:
        torch.testing.assert_close(den(x, t, Conditioning(class_labels=labels), guidance_scale=w),
                                   uncond_x0 + w * (cond_x0 - uncond_x0))
    torch.testing.assert_close(den(x, t, Conditioning(class_labels=labels), guidance_scale=0.0), uncond_x0)
    # per-sample scales (LCM) equal per-sample scalar calls
    w = torch.tensor([1.0, 2.0, 3.0, 1.5, 4.0, 0.5], dtype=torch.float64)
    got = den(x, t, Conditioning(class_labels=labels), guidance_scale=w)
    torch.testing.assert_close(got, uncond_x0 + w[:, None] * (cond_x0 - uncond_x0))


def test_guidance_convention_conversion():
    assert standard_guidance_scale(4.5, "standard") == 4.5
    assert standard_guidance_scale(3.5, "delta") == 4.5  # x_c + g(x_c - x_u) with g = w - 1
    with pytest.raises(ValueError):
        standard_guidance_scale(1.0, "dmd")


def test_cfg_in_eps_space_equals_cfg_in_x0_space(randomize_weights):
    unet = randomize_weights(tiny_unet(num_class_embeds=4))
    den = UNet2DDenoiser(unet, VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]), "epsilon",
                         null_class=3)
    x = torch.randn(2, 1, 8, 8)
    cond = Conditioning(class_labels=torch.tensor([0, 2]))
    with torch.no_grad():
        e_c, e_u = den(x, 500.0, cond, output="eps"), den(x, 500.0, Conditioning(class_labels=torch.tensor([3, 3])), output="eps")
        x0_cfg = den(x, 500.0, cond, guidance_scale=3.0)
    e_cfg = e_u + 3.0 * (e_c - e_u)
    a, s = den.schedule.alpha_sigma(500.0)
    torch.testing.assert_close(x0_cfg, ((x - s * e_cfg) / a).float(), rtol=1e-4, atol=1e-4)


def test_features_hook_returns_bottleneck_and_leaves_output_unchanged(randomize_weights):
    unet = randomize_weights(tiny_unet(num_class_embeds=4))
    den = UNet2DDenoiser(unet, VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]), "epsilon", null_class=3)
    x, cond = torch.randn(2, 1, 8, 8), Conditioning(class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        plain = den(x, 100.0, cond)
        pred, feats = den.denoise_with_features(x, 100.0, cond)
    torch.testing.assert_close(pred, plain)
    assert feats.shape == (2, 16, 4, 4)
    assert not den.feature_module._forward_hooks  # the hook is removed again


@pytest.mark.parametrize("build", ["unet", "cond_unet", "dit"])
def test_features_alone_stop_at_the_bottleneck_and_keep_gradients(build, randomize_weights):
    schedule = VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"])
    if build == "unet":
        den = UNet2DDenoiser(randomize_weights(tiny_unet(num_class_embeds=4)), schedule, "epsilon", null_class=3)
        x, cond, later = torch.randn(2, 1, 8, 8), Conditioning(class_labels=torch.tensor([1, 2])), "up_blocks"
    elif build == "cond_unet":
        den = UNet2DConditionDenoiser(randomize_weights(tiny_cond_unet()), schedule, "epsilon")
        x, cond, later = torch.randn(2, 2, 8, 8), Conditioning(encoder_hidden_states=torch.randn(2, 5, 12)), "up_blocks"
    else:
        den = build_adapter(randomize_weights(tiny_dit()), schedule, "epsilon")
        x, cond, later = torch.randn(2, 2, 8, 8), Conditioning(class_labels=torch.tensor([0, 4])), "proj_out_2"
    calls = []
    getattr(den.network, later).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        _, reference = den.denoise_with_features(x, 300.0, cond)
    calls.clear()
    xg = x.clone().requires_grad_(True)
    feats = den.features(xg, 300.0, cond)
    torch.testing.assert_close(feats, reference)
    assert not calls  # what follows the bottleneck never ran
    feats.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert not den.feature_module._forward_hooks


def test_text_conditioned_adapter_and_cfg(randomize_weights):
    unet = randomize_weights(tiny_cond_unet())
    den = UNet2DConditionDenoiser(unet, VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["scaled_linear"]), "epsilon")
    x = torch.randn(2, 2, 8, 8)
    text, empty = torch.randn(2, 5, 12), torch.zeros(2, 5, 12)
    cond = Conditioning(encoder_hidden_states=text, uncond_encoder_hidden_states=empty)
    with torch.no_grad():
        c = den(x, 600.0, cond)
        u = den(x, 600.0, Conditioning(encoder_hidden_states=empty))
        g = den(x, 600.0, cond, guidance_scale=5.0)
        _, feats = den.denoise_with_features(x, 600.0, cond)
    torch.testing.assert_close(g, u + 5.0 * (c - u), rtol=1e-4, atol=1e-4)
    assert feats.shape[0] == 2
    with pytest.raises(DiffDistillError, match="empty-prompt"):
        den(x, 600.0, Conditioning(encoder_hidden_states=text), guidance_scale=2.0)
    with pytest.raises(DiffDistillError, match="text-conditioned"):
        den(x, 600.0)


def test_dit_adapter_learned_sigma_split_and_null_class(randomize_weights):
    dit = randomize_weights(tiny_dit())
    den = build_adapter(dit, VPSchedule.from_scheduler_config(SCHEDULER_CONFIGS["linear"]), "epsilon")
    assert isinstance(den, DiTDenoiser) and den.null_class == 5
    x, labels = torch.randn(2, 2, 8, 8), torch.tensor([0, 4])
    with torch.no_grad():
        eps = den(x, 200.0, Conditioning(class_labels=labels), output="eps")
        raw = dit(x, timestep=torch.tensor([200.0, 200.0]), class_labels=labels).sample
        u = den(x, 200.0, Conditioning(class_labels=torch.tensor([5, 5])))
        c = den(x, 200.0, Conditioning(class_labels=labels))
        g = den(x, 200.0, Conditioning(class_labels=labels), guidance_scale=4.0)
        _, feats = den.denoise_with_features(x, 200.0, Conditioning(class_labels=labels))
    torch.testing.assert_close(eps, raw[:, :2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, u + 4.0 * (c - u), rtol=1e-4, atol=1e-4)
    assert feats.shape == (2, 16, 16)  # (batch, tokens, hidden)


def test_save_and_load_pipeline_round_trip(tmp_path, randomize_weights):
    unet = randomize_weights(tiny_unet(num_class_embeds=5))
    cfg = {**SCHEDULER_CONFIGS["squaredcos_cap_v2"], "prediction_type": "v_prediction"}
    meta = {"num_classes": 4, "null_class": 4, "guidance_scale": 2.0}
    save_pipeline_dir(tmp_path / "teacher", unet, cfg, meta)
    loaded = load_pretrained(tmp_path / "teacher")
    den = loaded.denoiser
    assert den.prediction_type == "v" and den.null_class == 4 and den.guidance_scale == 2.0
    assert loaded.num_classes == 4 and loaded.meta == meta
    assert not any(p.requires_grad for p in den.parameters())
    assert den.schedule == VPSchedule.from_scheduler_config(cfg)
    ref = UNet2DDenoiser(unet, VPSchedule.from_scheduler_config(cfg), "v", null_class=4)
    x, cond = torch.randn(2, 1, 8, 8), Conditioning(class_labels=torch.tensor([0, 3]))
    with torch.no_grad():
        torch.testing.assert_close(den(x, 321.0, cond), ref(x, 321.0, cond, guidance_scale=2.0))
    index = json.loads((tmp_path / "teacher" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_pretrained(tmp_path / "nope")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="Hugging Face Hub") as err:
        load_pretrained("someone/not-a-real-model-xyz")
    assert "someone/not-a-real-model-xyz" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pretrained(tmp_path / "empty")
