"""The bad-input catalogue (issue 7): every case is answered through the CLI by exactly one error line
(what is wrong, where, how to fix it) on stderr, exit status 2, no traceback unless ``--debug``, and an
existing run directory is left byte for byte as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from diffdistill.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.resolution=8", "train.batch_size=4", "train.sample_every=0", "critic.updates=1"]


def dmd2(teacher, *extra):
    return ["distill", "--config", str(REPO / "configs/digits/dmd2.yaml"), f"teacher={teacher}", *TINY, *extra]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tiny_teacher_dir, tmp_path_factory):
    """A finished 1-step DMD2 run on the tiny teacher (2 steps, one checkpoint)."""
    run = tmp_path_factory.mktemp("existing") / "run"
    assert main([*dmd2(tiny_teacher_dir, "train.max_steps=2"), "--output", str(run), "--quiet"]) == 0
    return run


def image_folder(root: Path, bad: str | None = None, num: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"{i}.png")
    if bad == "corrupt":
        (root / "broken.png").write_bytes(b"this is not a png")
    elif bad == "truncated":
        data = (root / "0.png").read_bytes()
        (root / "cut.png").write_bytes(data[: len(data) // 2])
    return root


def case_corrupt_image(t, tmp, run):
    folder = image_folder(tmp / "data", "corrupt")
    return dmd2(t, "data.dataset=folder", f"data.path={folder}", "--output", str(tmp / "o")), "broken.png"


def case_truncated_image(t, tmp, run):
    folder = image_folder(tmp / "data", "truncated")
    return dmd2(t, "data.dataset=folder", f"data.path={folder}", "--output", str(tmp / "o")), "cut.png"


def case_empty_data_folder(t, tmp, run):
    (tmp / "empty").mkdir()
    return dmd2(t, "data.dataset=folder", f"data.path={tmp / 'empty'}", "--output", str(tmp / "o")), "no images"


def case_channels_do_not_match_the_teacher(t, tmp, run):
    from conftest import captioned_folder

    folder = captioned_folder(tmp / "rgb", size=8)  # RGB images for the one-channel digits teacher
    return dmd2(t, "data.dataset=folder", f"data.path={folder}", "data.channels=3", "--output", str(tmp / "o")), \
        "data.channels=1"


def case_resolution_the_teacher_cannot_take(t, tmp, run):
    return dmd2(t, "data.resolution=9", "--output", str(tmp / "o")), "data.resolution=8"


def case_unknown_method(t, tmp, run):
    return dmd2(t, "method=dmd3", "--output", str(tmp / "o")), "did you mean"


def case_unknown_config_key(t, tmp, run):
    return dmd2(t, "train.max_step=3", "--output", str(tmp / "o")), "did you mean"


def case_wrong_type(t, tmp, run):
    return dmd2(t, "train.batch_size=many", "--output", str(tmp / "o")), "train.batch_size"


def case_out_of_range(t, tmp, run):
    return dmd2(t, "student_optim.lr=-1", "--output", str(tmp / "o")), "student_optim.lr"


def case_missing_teacher_path(t, tmp, run):
    return dmd2(tmp / "no_such_teacher", "--output", str(tmp / "o")), "no_such_teacher"


def case_hub_id_without_network(t, tmp, run):
    return dmd2("nobody-here/no-such-model", "--output", str(tmp / "o")), "nobody-here/no-such-model"


def case_resume_a_run_of_another_method(t, tmp, run):
    args = ["distill", "--config", str(REPO / "configs/digits/sid.yaml"), f"teacher={t}", *TINY[:3]]
    return [*args, "--output", str(run), "--resume"], "method"


def case_resume_with_another_config(t, tmp, run):
    return [*dmd2(t, "train.batch_size=8"), "--output", str(run), "--resume"], "train.batch_size"


def case_student_teacher_shape_mismatch(t, tmp, run):
    """The run's checkpoint evaluated against a teacher of another shape (its config edited by hand)."""
    import shutil

    copy = tmp / "edited"
    shutil.copytree(run, copy)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace(str(t), "null"))  # now the shipped 16 px teacher
    return ["eval", "--run", str(copy), "--steps", "1", "--num", "200", "--teacher-steps", "0"], "does not fit"


def case_eval_with_fewer_samples_than_feature_dims(t, tmp, run):
    return ["eval", "--run", str(run), "--steps", "1", "--num", "20", "--output", str(tmp / "m")], "--num"


def case_text_teacher_without_prompts(t, tmp, run):
    from conftest import tiny_text_pipeline

    teacher = tiny_text_pipeline(tmp / "text_teacher", channels=1)
    return dmd2(teacher, "--output", str(tmp / "o")), "text-conditioned"


def case_output_not_writable(t, tmp, run):
    (tmp / "a_file").write_text("x")
    return dmd2(t, "--output", str(tmp / "a_file" / "run")), "a_file"


def case_missing_config_file(t, tmp, run):
    return ["distill", "--config", str(tmp / "nope.yaml"), "--output", str(tmp / "o")], "nope.yaml"


def case_export_without_checkpoint(t, tmp, run):
    import shutil

    copy = tmp / "no_ckpt"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints")
    return ["export", "--run", str(copy), "--output", str(tmp / "e")], "no checkpoint"


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_one_clear_line(name, tiny_teacher_dir, existing_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFDISTILL_CACHE", str(tmp_path / "cache"))
    before = snapshot(existing_run)
    argv, expected = CASES[name](tiny_teacher_dir, tmp_path, existing_run)
    capsys.readouterr()  # what making the case printed
    code = main([*argv, "--quiet"] if argv[0] in ("distill", "eval") else argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"diffdistill {argv[0]}: error: "), err[-2000:]
    assert "Traceback" not in err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert snapshot(existing_run) == before  # nothing of the existing run changed


def test_the_catalogue_is_at_least_fifteen_cases():
    assert len(CASES) >= 15


def test_debug_shows_the_traceback(tiny_teacher_dir, tmp_path, capsys):
    assert main([*dmd2(tiny_teacher_dir, "method=dmd3"), "--output", str(tmp_path / "o"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("diffdistill distill: error:")
