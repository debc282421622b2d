"""The evaluation harness: metrics against independent computations, feature extractors, CLIP score,
and `diffdistill eval` end to end on a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from diffdistill.cli import main
from diffdistill.data import DataConfig, load_digits
from diffdistill.errors import DiffDistillError, ModelLoadError
from diffdistill.eval.features import DigitsFeatures, InceptionFeatures, get_feature_extractor
from diffdistill.eval.frechet import feature_statistics, frechet_distance
from diffdistill.eval.metrics import fid_from_features, kid, precision_recall, torchmetrics_fid, torchmetrics_kid
from diffdistill.eval.reference import load_reference

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def reference_cache(tmp_path_factory, monkeypatch):
    """Reference statistics go to a per-session temporary cache, never the user's."""
    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def random_features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    mixing = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)  # correlated features, one fixed law
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ mixing) * scale + shift


def independent_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """d² via the symmetric form Tr((Σ₁^½ Σ₂ Σ₁^½)^½), with eigen-decompositions instead of sqrtm of Σ₁Σ₂."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


@pytest.mark.parametrize("d", [8, 64])
def test_frechet_distance_matches_independent_and_clean_fid(d):
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    a, b = random_features(500, d, 0), random_features(700, d, 1, shift=0.3, scale=1.2)
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(independent_frechet(a, b), rel=1e-6)
    stats = (*feature_statistics(a), *feature_statistics(b))
    assert ours == pytest.approx(cleanfid_frechet(*stats), rel=1e-6)
    assert ours == pytest.approx(torchmetrics_fid(a, b), rel=1e-6)  # the second backend
    assert abs(frechet_distance(*feature_statistics(a), *feature_statistics(a))) < 1e-8  # identical sets


def test_kid_matches_clean_fid_and_torchmetrics_on_full_sets():
    from cleanfid.fid import kernel_distance

    a, b = random_features(300, 16, 2), random_features(300, 16, 3, shift=0.2)
    ours, _ = kid(a, b, subsets=1, subset_size=300)  # one subset of every point: no randomness left
    np.random.seed(0)
    assert ours == pytest.approx(kernel_distance(a, b, num_subsets=1, max_subset_size=300), rel=1e-9)
    assert ours == pytest.approx(torchmetrics_kid(a, b, subsets=1, subset_size=300)[0], rel=1e-9)
    same, _ = kid(a, random_features(300, 16, 4), subsets=20, subset_size=100)
    assert abs(same) < ours / 10  # unbiased: about 0 for two samples of one distribution


def test_precision_recall_closed_cases():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    real = np.concatenate([c + rng.normal(size=(200, 2)) for c in centres])
    half = np.concatenate([c + rng.normal(size=(400, 2)) for c in centres[:2]])  # two of four modes, same count
    p, r = precision_recall(half, real)
    assert p > 0.95 and 0.4 < r < 0.55
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real + 100, real) == (0.0, 0.0)


@pytest.mark.parametrize("mixture_name", ["single", "ring8"])
def test_sliced_wasserstein_to_a_mixture_matches_closed_forms(mixture_name):
    """SW2 to the mixture itself: a translate by ``d`` of the mixture's own samples is ``sqrt(mean_θ (θ·d)²)``
    away (each 1-D W2 of a translate is ``|θ·d|``), a single Gaussian scaled by ``a`` is ``|a − 1|·s`` away,
    and the mixture's own samples are close (their scatter only)."""
    from diffdistill.analytic import GaussianMixture
    from diffdistill.eval.sliced_wasserstein import sliced_wasserstein2_to_mixture

    mix = GaussianMixture([1.0], [[0.3, -0.2]], [0.25]) if mixture_name == "single" else GaussianMixture.ring()
    gen = torch.Generator().manual_seed(0)
    x = mix.sample(20000, generator=gen)[0].double()
    d = torch.tensor([1.0, 0.5], dtype=torch.float64)
    theta = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    expected = float((theta @ d).pow(2).mean().sqrt())

    def sw(points):
        return sliced_wasserstein2_to_mixture(points, mix, 64, torch.Generator().manual_seed(1), grid_size=50_000)

    own = sw(x)
    assert own < 0.05
    assert sw(x + d) == pytest.approx(expected, rel=0.01)
    if mixture_name == "single":
        centre = mix.means[0]
        assert sw((x - centre) * 1.2 + centre) == pytest.approx(0.2 * 0.5, abs=0.003)


def test_digits_fid_real_vs_held_out_is_small_and_noise_is_large(capsys):
    extractor = DigitsFeatures()
    reference = load_reference(DataConfig(), extractor, split="train", progress=False)
    held_out, _ = load_digits("test", 16)
    noise = torch.rand(len(held_out), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_fid = fid_from_features(extractor(held_out), reference.statistics)
    noise_fid = fid_from_features(extractor(noise), reference.statistics)
    with capsys.disabled():
        print(f"\ndigits FID: held-out real {real_fid:.4f} ({len(held_out)} images), uniform noise {noise_fid:.2f}")
    # 360 held-out images carry a sample-size bias (360 random train images score 0.6 against the other 1077)
    assert real_fid < 2 and noise_fid > 20 * real_fid
    # cached: the second load reads the file and gives the same statistics
    again = load_reference(DataConfig(), extractor, split="train", progress=False)
    assert again.path == reference.path and np.array_equal(again.mu, reference.mu)


def test_fid_refuses_fewer_samples_than_feature_dimensions():
    with pytest.raises(DiffDistillError, match="more samples than feature dimensions"):
        fid_from_features(random_features(100, 128, 0), random_features(500, 128, 1))


def test_inception_without_weights_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="download .*inception-2015-12-05.pt") as err:
        get_feature_extractor("inception-clean", weights=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(DiffDistillError, match="unknown feature extractor"):
        get_feature_extractor("inception-legacy_pytorch")


class _StandInInception(torch.nn.Module):
    """Same interface as clean-fid's TorchScript Inception (``layers``; ``forward(x, return_features)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear")
        return self.layers((x - 128) / 128)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_inception_extractor_plumbing_with_a_stand_in_network(tmp_path, mode):
    """The real weights cannot exist offline: a TorchScript stand-in with clean-fid's interface checks our
    side (8-bit rounding, grey→RGB, clean-fid's resizer to 299, output shape), not Inception itself."""
    torch.manual_seed(0)
    torch.jit.script(_StandInInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    extractor = InceptionFeatures(mode, weights=tmp_path / "inception-2015-12-05.pt")
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    features = extractor(images)
    assert features.shape == (3, 2048) and extractor.name == f"inception-{mode}"
    assert torch.allclose(features, extractor(images.repeat(1, 3, 1, 1)))  # grey = its RGB repeat
    assert not torch.allclose(features[0], features[1])


def tiny_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                  image_size=32),
                           text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return model, open_clip.get_tokenizer("ViT-B-32"), open_clip.image_transform(32, is_train=False)


def test_clip_score_is_100_times_clipped_cosine_by_hand():
    from PIL import Image

    from diffdistill.eval.clip_score import ClipScorer

    model, tokenizer, preprocess = tiny_clip()
    scorer = ClipScorer(model, tokenizer, preprocess, name="tiny")
    images = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red circle", "a digit seven", "two cats", "an empty room", "a blue square", "a zero"]
    by_hand = []
    for img, prompt in zip(images, prompts):
        arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pixels = preprocess(Image.fromarray(arr, "RGB")).unsqueeze(0)
        with torch.no_grad():
            e_img, e_txt = model.encode_image(pixels)[0].double(), model.encode_text(tokenizer([prompt]))[0].double()
        cos = float(e_img @ e_txt / (e_img.norm() * e_txt.norm()))
        by_hand.append(cos)
    assert min(by_hand) < 0 < max(by_hand)  # both sides of the clip are exercised
    expected = np.mean([100 * max(c, 0.0) for c in by_hand])
    assert scorer(images, prompts, batch_size=4) == pytest.approx(expected, rel=1e-5)
    assert scorer.scores(images, prompts).min() == 0.0


def test_clip_pretrained_offline_is_one_clear_error(tmp_path):
    from diffdistill.eval.clip_score import ClipScorer

    with pytest.raises(ModelLoadError, match="--clip-pretrained") as err:
        ClipScorer.from_pretrained("ViT-B-32", str(tmp_path / "missing.safetensors"))
    assert "\n" not in str(err.value)


# --- `diffdistill eval` end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert main(["distill", "--config", str(REPO / "configs/digits/consistency.yaml"), "--output", str(run),
                 "--max-steps", "4", "--quiet", "train.batch_size=4", "train.checkpoint_every=2",
                 "train.keep_checkpoints=3", "train.sample_every=0"]) == 0
    return run


def test_eval_writes_metrics_plot_and_grids(tiny_run, capsys):
    args = ["eval", "--run", str(tiny_run), "--steps", "1,2", "--teacher-steps", "1,2", "--num", "150",
            "--seeds", "2", "--torchmetrics-check", "--quiet"]
    assert main(args) == 0
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for who in ("student", "teacher"):
        assert set(metrics[who]["fid"]) == {"1", "2"}
        for n in ("1", "2"):
            seeds = metrics[who]["per_seed"]["fid"][n]
            assert len(seeds) == 2 and metrics[who]["fid"][n] == pytest.approx(np.mean(seeds))
            assert metrics[who]["fid_torchmetrics"][n] == pytest.approx(metrics[who]["fid"][n], rel=1e-6)
            assert 0 <= metrics[who]["precision"][n] <= 1 and 0 <= metrics[who]["recall"][n] <= 1
    assert metrics["feature_extractor"] == "digits" and metrics["num_samples"] == 150 and metrics["seeds"] == [0, 1]
    assert metrics["student"]["weights"].startswith("ema_") and metrics["student"]["checkpoint"] == "step_0000004"
    assert len(metrics["student"]["timesteps"]["2"]) == 2 and metrics["teacher"]["timesteps"]["1"] == [999.0]
    assert (tiny_run / "quality_vs_steps.png").stat().st_size > 0
    assert sorted(p.name for p in (tiny_run / "grids").iterdir()) == [
        "student_1step.png", "student_2step.png", "teacher_1step.png", "teacher_2step.png"]
    # deterministic: the same command gives the same numbers
    assert main(args) == 0
    again = json.loads((tiny_run / "metrics.json").read_text())
    assert again["student"]["fid"] == metrics["student"]["fid"] and again["teacher"]["kid"] == metrics["teacher"]["kid"]


def test_eval_teacher_numbers_match_an_independent_computation(tiny_run, tmp_path):
    """The harness's teacher FID = sampling, features and Fréchet distance done here by hand."""
    from diffdistill.denoiser import Conditioning
    from diffdistill.pretrained import load_pretrained
    from diffdistill.samplers import generate

    assert main(["eval", "--run", str(tiny_run), "--steps", "1", "--teacher-steps", "2", "--num", "140", "--quiet",
                 "--output", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "metrics.json").read_text())["teacher"]["fid"]["2"]
    teacher = load_pretrained()
    images = generate(teacher.denoiser, teacher.sample_shape, 140, sampler="ddim", num_steps=2, spacing="trailing",
                      cond=Conditioning(class_labels=torch.arange(140) % 10), seed=0)
    extractor = DigitsFeatures()
    real, _ = load_digits("train", 16)
    quantised = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # noqa: E731
    gen_f = extractor.model.features(quantised(images)).double().numpy()
    ref_f = extractor.model.features(quantised(real)).double().numpy()
    assert got == pytest.approx(independent_frechet(gen_f, ref_f), rel=1e-4)


def test_eval_sweeps_all_checkpoints(tiny_run, tmp_path):
    assert main(["eval", "--run", str(tiny_run), "--all-checkpoints", "--steps", "1", "--teacher-steps", "1",
                 "--num", "140", "--quiet", "--output", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "checkpoint_sweep.json").read_text())
    assert [r["checkpoint"] for r in table["checkpoints"]] == ["step_0000002", "step_0000004"]
    assert table["best"]["1"] in {"step_0000002", "step_0000004"} and "1" in table["teacher"]["fid"]


def test_eval_model_directly(tmp_path):
    from diffdistill.pretrained import shipped_teacher_path

    assert main(["eval", "--model", str(shipped_teacher_path()), "--steps", "1", "--num", "140", "--quiet",
                 "--output", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["fid"]["1"] > 0 and metrics["model"]["sampler"] == "ddim"


def test_eval_errors_are_one_line(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--run", str(empty), "--quiet"]) == 2
    assert "not a diffdistill run" in capsys.readouterr().err
    assert main(["eval", "--run", str(tiny_run), "--num", "100", "--teacher-steps", "0", "--quiet",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "feature dimensions" in err and err.count("\n") == 1
    assert main(["eval", "--run", str(tiny_run), "--checkpoint", "step_9", "--quiet"]) == 2
    assert "missing or corrupt" in capsys.readouterr().err


def test_text_teacher_encodes_prompts_like_its_text_encoder(tmp_path):
    from conftest import tiny_text_pipeline

    from diffdistill.pretrained import load_pretrained

    teacher = load_pretrained(tiny_text_pipeline(tmp_path / "pipe"))
    assert teacher.text_conditioned
    cond = teacher.encode_prompts(["a cat", "two dogs", "a cat"])
    tokens = teacher.tokenizer(["a cat", ""], padding="max_length", max_length=16, truncation=True,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        direct = teacher.text_encoder(tokens)[0]
    assert torch.allclose(cond.encoder_hidden_states[0], direct[0], atol=1e-6)
    assert torch.equal(cond.encoder_hidden_states[0], cond.encoder_hidden_states[2])
    assert torch.allclose(cond.uncond_encoder_hidden_states[1], direct[1], atol=1e-6)


def test_eval_text_model_with_prompts_adds_clip_score(tmp_path, capsys):
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    from conftest import tiny_text_pipeline

    pipe = tiny_text_pipeline(tmp_path / "pipe")
    model, _, _ = tiny_clip()
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                                           "image_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(clip_dir / "open_clip_model.safetensors"))
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(150):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f"{i:03d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo cats\n\na zero\n")
    out = tmp_path / "out"
    assert main(["eval", "--model", str(pipe), "--steps", "1,2", "--num", "140", "--quiet", "--output", str(out),
                 "--prompts", str(prompts), "--clip-model", f"local-dir:{clip_dir}", "--data-path", str(data),
                 "--resolution", "8", "--channels", "3", "--features", "digits"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["model"]["clip_score"]) == {"1", "2"} and metrics["num_prompts"] == 3
    assert all(0 <= v <= 100 for v in metrics["model"]["clip_score"].values())
    assert metrics["clip_model"].startswith("open_clip:local-dir:") and open_clip is not None
    # without prompts a text-conditioned model is refused in one line
    assert main(["eval", "--model", str(pipe), "--steps", "1", "--num", "140", "--quiet", "--output", str(out),
                 "--data-path", str(data), "--resolution", "8", "--features", "digits"]) == 2
    assert "text-conditioned: give --prompts FILE" in capsys.readouterr().err


def test_eval_rejects_bad_seed_and_step_lists():
    for bad in (["--seeds", "0"], ["--steps", "0,4"], ["--teacher-steps", "0,4"]):
        with pytest.raises(SystemExit) as err:
            main(["eval", "--run", "x", *bad])
        assert err.value.code == 2


def test_reference_cache_key_follows_the_feature_network_weights(tmp_path):
    """A regenerated or different classifier must not reuse cached features made by the old one."""
    from diffdistill.eval.digits_classifier import DigitsClassifier, save_digits_classifier
    from diffdistill.eval.reference import reference_path

    torch.manual_seed(0)
    for name in ("a", "b"):
        save_digits_classifier(DigitsClassifier(), tmp_path / name / "clf.safetensors", 0.0)
    first, second = (DigitsFeatures(tmp_path / n / "clf.safetensors") for n in ("a", "b"))
    assert first.name == second.name  # same file name ...
    assert reference_path(DataConfig(), "train", first) != reference_path(DataConfig(), "train", second)  # ... other key


def test_eval_guidance_scale_sets_teacher_cfg_and_lcm_student_scale(tiny_run, tmp_path):
    """`--guidance-scale w`: the teacher samples with CFG at w (= sampling it by hand at w), an LCM student
    samples at w (the config's own scale reproduces the default), and other students sample as trained."""
    from diffdistill.denoiser import Conditioning
    from diffdistill.pretrained import load_pretrained
    from diffdistill.samplers import generate

    lcm = tmp_path / "lcm"
    assert main(["distill", "--config", str(REPO / "configs/digits/lcm.yaml"), "--output", str(lcm), "--max-steps",
                 "2", "--quiet", "train.batch_size=4", "train.sample_every=0", "lcm.num_scales=4"]) == 0
    fid = {}
    for name, extra in {"default": [], "w1.5": ["--guidance-scale", "1.5"],
                        "delta": ["--guidance-scale", "0.5", "--guidance-convention", "delta"]}.items():
        out = tmp_path / name
        assert main(["eval", "--run", str(lcm), "--steps", "1", "--teacher-steps", "1", "--num", "140", "--quiet",
                     "--output", str(out), *extra]) == 0
        fid[name] = json.loads((out / "metrics.json").read_text())
    assert fid["default"]["student"]["guidance_scale"] == 1.5 and "guidance_scale" not in fid["default"]["teacher"]
    assert fid["w1.5"]["student"]["fid"] == fid["default"]["student"]["fid"]  # the config samples at w = 1.5
    assert fid["delta"]["student"]["guidance_scale"] == 1.5 == fid["delta"]["teacher"]["guidance_scale"]
    assert fid["delta"]["student"]["fid"] == fid["w1.5"]["student"]["fid"]
    assert fid["delta"]["teacher"]["fid"] == fid["w1.5"]["teacher"]["fid"] != fid["default"]["teacher"]["fid"]
    teacher = load_pretrained()
    images = generate(teacher.denoiser, teacher.sample_shape, 140, sampler="ddim", num_steps=1, spacing="trailing",
                      cond=Conditioning(class_labels=torch.arange(140) % 10), guidance_scale=1.5, seed=0)
    quantised = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # noqa: E731
    model = DigitsFeatures().model
    gen_f = model.features(quantised(images)).double().numpy()
    ref_f = model.features(quantised(load_digits("train", 16)[0])).double().numpy()
    assert fid["w1.5"]["teacher"]["fid"]["1"] == pytest.approx(independent_frechet(gen_f, ref_f), rel=1e-4)
    # a student that does not embed the scale samples as trained; only its teacher changes
    plain = []
    for i, extra in enumerate([[], ["--guidance-scale", "3"]]):
        assert main(["eval", "--run", str(tiny_run), "--steps", "1", "--teacher-steps", "0", "--num", "140",
                     "--quiet", "--output", str(tmp_path / f"c{i}"), *extra]) == 0
        plain.append(json.loads((tmp_path / f"c{i}" / "metrics.json").read_text())["student"])
    assert plain[0]["fid"] == plain[1]["fid"] and "guidance_scale" not in plain[1]
    assert main(["eval", "--run", str(tiny_run), "--all-checkpoints", "--guidance-scale", "2", "--quiet"]) == 2
