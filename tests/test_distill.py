"""`simclr distill` (SimCLRv2 §2.3): the loss against the formula, a resumed run against an uninterrupted one, the
refusals, and the whole pretrain -> finetune -> distill path through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.engine.checkpoint import EncoderInfo, load_encoder, save_encoder
from simclr_cli.engine.configs import DistillConfig
from simclr_cli.engine.errors import CheckpointError, DataError
from simclr_cli.engine.loss import distillation_loss
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.tasks import distill
from tests.test_cli import one_line_error

runner = CliRunner()
CPU = dict(device="cpu", precision="fp32", workers=0)


# --- the loss -------------------------------------------------------------------------------------------


def naive_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """-1/N sum_x sum_y P_T(y|x; tau) log P_S(y|x; tau), one example and one class at a time."""
    total = 0.0
    for s, t in zip(student, teacher):
        t_norm = sum(torch.exp(t[k] / tau) for k in range(len(t)))
        s_norm = sum(torch.exp(s[k] / tau) for k in range(len(s)))
        for y in range(len(s)):
            p_teacher = torch.exp(t[y] / tau) / t_norm
            total = total - p_teacher * torch.log(torch.exp(s[y] / tau) / s_norm)
    return total / len(student)


@pytest.mark.parametrize("tau", [1.0, 0.1, 3.0])
def test_the_loss_and_its_gradient_follow_the_formula(tau):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    got = distillation_loss(student, teacher, tau)
    expected = naive_distillation_loss(student, teacher.detach(), tau)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got, student, retain_graph=True)
    (naive_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad.double(), naive_grad, rtol=1e-5, atol=1e-7)
    # closed form: (P_S - P_T) / (tau N), and no gradient reaches the teacher
    closed = (torch.softmax(student / tau, 1) - torch.softmax(teacher / tau, 1)) / (tau * len(student))
    torch.testing.assert_close(grad.double(), closed.detach(), rtol=1e-5, atol=1e-7)
    got.backward()
    assert teacher.grad is None


def test_the_loss_is_smallest_when_the_student_matches_the_teacher():
    teacher = torch.randn(3, 5)
    matched = distillation_loss(teacher.clone(), teacher, 1.0)
    assert matched < distillation_loss(teacher + torch.randn(3, 5), teacher, 1.0)


# --- the task -------------------------------------------------------------------------------------------


def teacher_file(folder: Path, *, task: str | None = "finetune", classes: int = 3) -> Path:
    """A fine-tuned teacher (a random network and classifier): distillation needs only its logits."""
    torch.manual_seed(5)
    cfg = ModelConfig(arch="resnet18", width=0.25, stem="small", proj_dim=8)
    model = build_model(cfg)
    extra_tensors = {"classifier.weight": torch.randn(classes, 128), "classifier.bias": torch.randn(classes)}
    extra = {"task": task, "num_classes": classes, "from_head_layer": 0} if task else {}
    info = EncoderInfo(model=cfg, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear",
                       config={"data": {"source": None}}, epoch=1, step=1, extra=extra,
                       extra_tensors=extra_tensors if task else {})
    path = folder / ("finetuned.safetensors" if task else "encoder.safetensors")
    save_encoder(path, model, info=info)
    return path


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(image_folder, tmp_path):
    teacher = teacher_file(tmp_path)
    cfg = DistillConfig(data=str(image_folder), epochs=2, batch_size=8, **CPU)
    whole = distill.run(cfg, teacher=teacher, out=tmp_path / "whole")
    part = tmp_path / "part"
    distill.run(cfg, teacher=teacher, out=part)
    newest = sorted((part / "checkpoints").glob("step-*.safetensors"))[-1]
    newest.unlink()  # as if the run had stopped after its first epoch
    resumed = distill.run(cfg, teacher=teacher, out=part, resume_run=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    a, b = load_file(str(whole.student)), load_file(str(resumed.student))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 2


def test_the_student_file_is_an_encoder_with_a_classifier_naming_its_teacher(image_folder, tmp_path):
    teacher = teacher_file(tmp_path)
    cfg = DistillConfig(data=str(image_folder), epochs=1, batch_size=8, student_width=0.125, student_sk_ratio=0.0625, **CPU)
    result = distill.run(cfg, teacher=teacher, out=tmp_path / "run")
    model, info = load_encoder(result.student)
    assert (info.model.width, info.model.sk_ratio) == (0.125, 0.0625)
    assert info.extra["task"] == "distill" and info.extra["teacher"] == str(teacher)
    assert info.extra_tensors["classifier.weight"].shape == (3, model.encoder.out_dim)
    assert (info.image_size, info.mean) == (16, (0.5, 0.5, 0.5))  # the teacher's input transform
    assert result.top1 is None  # a folder without labels: nothing to evaluate on


def test_a_plain_encoder_is_refused_naming_finetune(image_folder, tmp_path):
    encoder = teacher_file(tmp_path, task=None)
    with pytest.raises(CheckpointError, match=r"holds no fine-tuned classifier .*make one with `simclr finetune`"):
        distill.run(DistillConfig(data=str(image_folder), epochs=1, **CPU), teacher=encoder, out=tmp_path / "r")
    message = one_line_error(runner.invoke(app, ["distill", str(encoder), str(image_folder), "--out", str(tmp_path / "c")]))
    assert "simclr finetune" in message


def test_val_data_with_other_classes_is_named(image_folder, tmp_path):
    teacher = teacher_file(tmp_path, classes=4)
    with pytest.raises(DataError, match=r"--val digits has 10 classes but the teacher's classifier has 4"):
        distill.run(DistillConfig(data=str(image_folder), val="digits", epochs=1, **CPU), teacher=teacher, out=tmp_path / "r")


# --- the three steps through the command line ------------------------------------------------------------


def test_pretrain_finetune_distill_then_evaluate_the_student(tmp_path):
    tiny = ["--device", "cpu", "--workers", "0"]
    assert runner.invoke(app, ["pretrain", "--width", "0.25", "--head-layers", "3", "--max-steps", "2", *tiny,
                               "--out", str(tmp_path / "pre")]).exit_code == 0
    finetuned = runner.invoke(app, ["finetune", str(tmp_path / "pre" / "encoder.safetensors"), "--from-head-layer", "1",
                                    "--label-fraction", "0.1", "--epochs", "1", *tiny, "--out", str(tmp_path / "ft")])
    assert finetuned.exit_code == 0, finetuned.output
    out = tmp_path / "student"
    result = runner.invoke(app, ["distill", str(tmp_path / "ft" / "finetuned.safetensors"), "--epochs", "1",
                                 "--student-width", "0.125", *tiny, "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["val"] == "digits" and 0 <= results["top1"] <= 1 and 0 <= results["teacher_top1"] <= 1
    student = str(out / "student.safetensors")
    described = runner.invoke(app, ["info", student])
    assert described.exit_code == 0 and "distilled" in described.output
    assert runner.invoke(app, ["knn", student, "--data", "digits", *tiny, "--out", str(tmp_path / "knn")]).exit_code == 0
    assert runner.invoke(app, ["linear-eval", student, "--data", "digits", *tiny, "--out", str(tmp_path / "le")]).exit_code == 0
    again = runner.invoke(app, ["distill", student, "--epochs", "1", *tiny, "--out", str(out)])
    assert "already holds a run" in one_line_error(again)
