"""`diffdistill demo`: the main job end to end (train two students side by side, evaluate them beside the
teacher, export, report) on a tiny budget."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from diffdistill.cli import main


def test_demo_trains_evaluates_exports_and_reports(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--max-steps", "2", "--num", "130", "--teacher-steps", "1,4",
                 "--quiet", f"teacher={tiny_teacher_dir}", "data.resolution=8", "train.batch_size=4"]) == 0
    assert "report.md" in capsys.readouterr().out
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["dmd2_1step"]["fid"]) == set(metrics["dmd2_4step"]["fid"]) == {"1", "2", "4"}
    assert set(metrics["teacher"]["fid"]) == {"1", "4"} and metrics["num_samples"] == 130
    for label in ("dmd2_1step", "dmd2_4step"):  # each student trained for exactly the budget
        steps = [json.loads(line)["step"] for line in (out / "runs" / label.replace("_1step", "")
                                                       ).joinpath("log.jsonl").read_text().splitlines()]
        assert steps[-1] == 2
    report = (out / "report.md").read_text()
    for row in ("| dmd2_1step | 1 |", "| dmd2_4step | 4 |", "| teacher | 4 |"):
        assert row in report
    for image in ("eval/quality_vs_steps.png", "eval/grids/teacher_4step.png", "eval/grids/dmd2_1step_1step.png",
                  "eval/grids/dmd2_4step_4step.png"):
        assert f"]({image})" in report and (out / image).stat().st_size > 0
    index = json.loads((out / "export" / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert json.loads((out / "export" / "diffdistill.json").read_text())["student"]["default_steps"] == 1
    student = load_file(next((out / "runs" / "dmd2" / "checkpoints").iterdir()) / "student.safetensors")
    assert student  # the exported run has its checkpoint


def test_demo_refuses_a_non_empty_output_and_an_unknown_method(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["demo", "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(["demo", "--output", str(tmp_path / "new"), "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no config" in err and "dmd2" in err and err.count("\n") == 1
