"""`describe`: what an encoder or fine-tuned file holds, and the evaluations found beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simclr_cli.engine.checkpoint import EncoderInfo, save, save_encoder
from simclr_cli.engine.errors import CheckpointError
from simclr_cli.engine.tasks.info import describe, find_evaluations
from simclr_cli.engine.model import ModelConfig, build_model

CONFIG = {"model": {"arch": "resnet18"}, "train": {"epochs": 3, "global_batch_size": 64}, "data": {"source": "digits"}}


def saved(folder: Path, *, name: str = "encoder.safetensors", extra: dict | None = None, extra_tensors: dict | None = None):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", width=0.25, stem="small", head_layers=3, proj_dim=32)
    model = build_model(cfg)
    info = EncoderInfo(
        model=cfg, image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bilinear",
        config=CONFIG, epoch=3, step=42, extra=extra or {}, extra_tensors=extra_tensors or {},
    )
    path = folder / name
    save_encoder(path, model, info=info)
    return path, model


def write_results(folder: Path, payload: dict | str) -> Path:
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_describe_an_encoder_with_evaluations_beside_it(tmp_path):
    path, model = saved(tmp_path)
    eval_dir = tmp_path / "eval"
    knn = write_results(eval_dir / "knn-x", {"protocol": "knn", "top1": 0.5, "top5": 0.875, "data": "digits", "k": [20]})
    linear = write_results(
        eval_dir / "linear-eval-20250102-030405-2", {"protocol": "cached", "top1": 0.75, "top5": None, "data": "cifar10"}
    )
    broken = write_results(eval_dir / "finetune-20250101-000000", "{not json")
    (eval_dir / "notes.txt").write_text("not an evaluation")
    (eval_dir / "empty-run").mkdir()

    info = describe(path)

    assert info.kind == "encoder"
    assert (info.architecture, info.width, info.stem, info.head_layers, info.proj_dim) == ("resnet18", 0.25, "small", 3, 32)
    assert info.feature_dim == 128
    assert info.encoder_parameters == sum(p.numel() for p in model.encoder.parameters())
    assert info.head_parameters == sum(p.numel() for p in model.head.parameters())
    assert info.classifier_parameters == 0
    assert info.total_parameters == sum(p.numel() for p in model.parameters())
    assert (info.image_size, info.mean, info.std, info.interpolation) == (16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bilinear")
    assert (info.epoch, info.step) == (3, 42)
    assert info.config == CONFIG
    assert info.file_bytes == path.stat().st_size

    assert [r.path for r in info.evaluations] == sorted([knn, linear, broken])
    by_path = {r.path: r for r in info.evaluations}
    assert (by_path[knn].command, by_path[knn].protocol, by_path[knn].data) == ("knn-x", "knn", "digits")
    assert (by_path[knn].top1, by_path[knn].top5, by_path[knn].error) == (0.5, 0.875, None)
    assert (by_path[linear].command, by_path[linear].protocol, by_path[linear].top1, by_path[linear].top5) == (
        "linear-eval", "cached", 0.75, None,
    )
    assert by_path[broken].command == "finetune" and by_path[broken].top1 is None and by_path[broken].error

    out = json.loads(json.dumps(info.to_dict()))
    assert out["parameters"] == {
        "encoder": info.encoder_parameters, "head": info.head_parameters, "classifier": 0, "total": info.total_parameters,
    }
    assert out["mean"] == [0.5, 0.4, 0.3] and out["path"] == str(path)
    assert out["evaluations"][1] == {
        "path": str(knn), "command": "knn-x", "protocol": "knn", "data": "digits", "top1": 0.5, "top5": 0.875, "error": None, "baseline": False,
    }


def test_describe_a_fine_tuned_file(tmp_path):
    extra = {"task": "finetune", "num_classes": 10, "from_head_layer": 1, "classes": [str(i) for i in range(10)]}
    weight, bias = torch.zeros(10, 128), torch.zeros(10)
    path, model = saved(
        tmp_path, name="finetuned.safetensors", extra=extra,
        extra_tensors={"classifier.weight": weight, "classifier.bias": bias},
    )
    info = describe(path)
    assert info.kind == "fine-tuned"
    assert info.extra == extra
    assert info.classifier_parameters == 10 * 128 + 10
    assert info.total_parameters == sum(p.numel() for p in model.parameters()) + 10 * 128 + 10
    assert info.evaluations == ()


def test_other_extra_is_still_an_encoder(tmp_path):
    path, _ = saved(tmp_path, extra={"note": "distilled"})
    assert describe(path).kind == "encoder"


def test_bad_files_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        describe(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is not a safetensors file: it is a text file"):
        describe(junk)
    state = tmp_path / "step-000000001.safetensors"
    save(state, {"model/w": torch.zeros(2)}, kind="train-state", meta={"step": 1, "epoch": 0})
    with pytest.raises(CheckpointError, match=r"is a training-state checkpoint \(what --resume reads\), not an encoder"):
        describe(state)


def test_find_evaluations_in_a_folder_without_any(tmp_path):
    assert find_evaluations(tmp_path) == ()


def test_a_results_file_that_is_not_an_object_is_listed_with_its_error(tmp_path):
    path = write_results(tmp_path / "eval" / "knn-20250101-000000", "[0.5]")
    (record,) = find_evaluations(tmp_path)
    assert (record.path, record.command, record.top1, record.error) == (path, "knn", None, "not a JSON object")


def test_describe_names_the_method_and_older_files_are_simclr(tmp_path):
    path, _ = saved(tmp_path)  # CONFIG has no train.method: written before methods had names
    described = describe(path)
    assert described.method == "simclr" and described.to_dict()["method"] == "simclr"
    info = EncoderInfo(model=ModelConfig(), image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear",
                       config={"train": {"method": "moco"}}, epoch=0, step=0)
    assert info.method == "moco"  # what the run's config names
