"""`simclr compare`: the probes' labels and targets against hand-built or naive ones, Spearman against a hand-worked
example, the cache, a failed row, and the command end to end on tiny images."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_images
from multiprocess import run_on_two_processes, simclr_on_two_processes
from simclr_cli.cli import app
from simclr_cli.engine import checkpoint, features, probes
from simclr_cli.engine.augment import eval_transform
from simclr_cli.engine.ranks import ranks, spearman
from test_knn import tiny_checkpoint

runner = CliRunner()
# a short L-BFGS: the tiny probes are separable, and a full fit would run to max_iter on every one
COMMON = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "32", "--set", "compare.max_iter=30"]


# --- the probes' labels and targets -------------------------------------------------------------------------------

def test_rotation_matches_torch_rot90_and_the_views_are_labelled_by_turns():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    for turns in range(4):
        assert torch.equal(probes.rotate(x, turns), torch.rot90(x, turns, dims=(2, 3)))
    corner = torch.zeros(1, 4, 4)
    corner[0, 0, 3] = 1  # top-right; a quarter turn counter-clockwise takes it to the top-left
    assert probes.rotate(corner, 1)[0, 0, 0] == 1
    images = [torch.randn(3, 4, 4) for _ in range(2)]
    views = probes.rotated_views(images, lambda t: t, turns=(1, 2, 3))
    assert len(views) == 6
    for i in range(6):  # image-major: image i // 3, turned (1, 2, 3)[i % 3]
        assert torch.equal(views[i], torch.rot90(images[i // 3], (1, 2, 3)[i % 3], dims=(1, 2)))


def test_jigsaw_patches_and_pair_labels_on_a_hand_built_grid():
    # a 6 px image whose 2 px cells hold their own row-major index: cell r, c is 3 r + c
    cells = torch.arange(9, dtype=torch.float32).view(3, 3)
    x = cells.repeat_interleave(2, 0).repeat_interleave(2, 1).expand(3, 6, 6)
    patches = probes.grid_patches(x)
    assert patches.shape == (9, 3, 6, 6)
    for i in range(9):  # each patch, resized back to 6 px, is its constant cell
        assert torch.allclose(patches[i], torch.full((3, 6, 6), float(i)))
    # features of two images' 9 patches: D = 1, the value says which cell the patch came from (+ 10 for image 2)
    feats = torch.tensor([[float(i) for i in range(9)], [10.0 + i for i in range(9)]]).unsqueeze(2)  # (2, 9, 1)
    rows, labels = probes.relative_pairs(feats)
    assert rows.shape == (16, 2) and labels.tolist() == list(range(8)) * 2
    # by hand: label 0 = top-left, 3 = left, 4 = right, 7 = bottom-right of the centre
    expected = {0: (4, 0), 1: (4, 1), 2: (4, 2), 3: (4, 3), 4: (4, 5), 5: (4, 6), 6: (4, 7), 7: (4, 8)}
    for label, (centre, neighbour) in expected.items():
        assert rows[label].tolist() == [centre, neighbour]
        assert rows[8 + label].tolist() == [10 + centre, 10 + neighbour]


def test_colour_targets_are_the_naive_cell_means_of_the_unnormalised_input():
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 8, 3), generator=rng, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    transform = eval_transform(image_size=8, mean=mean, std=std, interpolation="bilinear")
    got = probes.colour_targets([image], transform, mean=mean, std=std)  # (1, 4, 3)
    rgb = pixels.double() / 255
    for cell, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for channel in range(3):
            total = sum(float(rgb[y, x, channel]) for y in range(4 * r, 4 * r + 4) for x in range(4 * c, 4 * c + 4))
            assert float(got[0, cell, channel]) == pytest.approx(total / 16, abs=1e-5)


def test_ridge_recovers_a_linear_map_and_r2_is_one_for_it():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=g)
    y = x @ torch.randn(5, 3, generator=g) + 0.5
    predict = probes.fit_ridge(x, y, l2=0.0)
    assert probes.r2_score(predict(x), y) == pytest.approx(1.0, abs=1e-9)
    assert probes.r2_score(y.mean(dim=0).expand_as(y), y) == pytest.approx(0.0, abs=1e-9)


# --- ranks and Spearman -------------------------------------------------------------------------------------------

def naive_spearman(a: list[float], b: list[float]) -> float:
    """Without ties: 1 - 6 sum d^2 / (n (n^2 - 1)), the textbook formula."""
    n = len(a)

    def ranked(v):
        return [sorted(v, reverse=True).index(x) + 1 for x in v]

    d2 = sum((x - y) ** 2 for x, y in zip(ranked(a), ranked(b)))
    return 1 - 6 * d2 / (n * (n * n - 1))


def test_spearman_matches_the_textbook_formula_and_a_hand_worked_tie():
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        a, b = torch.randn(7, generator=g).tolist(), torch.randn(7, generator=g).tolist()
        assert spearman(a, b) == pytest.approx(naive_spearman(a, b), abs=1e-12)
    assert ranks([0.9, 0.5, 0.7, 0.5]) == [1.0, 3.5, 2.0, 3.5]
    # by hand: ranks (1, 3.5, 2, 3.5) and (1, 2, 3, 4); means 2.5; deviations (-1.5, 1, -0.5, 1) and (-1.5, -0.5, 0.5, 1.5)
    # cov = 2.25 - 0.5 - 0.25 + 1.5 = 3; var 2.25 + 1 + 0.25 + 1 = 4.5 and 5; rho = 3 / sqrt(22.5)
    assert spearman([0.9, 0.5, 0.7, 0.5], [4, 3, 2, 1]) == pytest.approx(3 / math.sqrt(22.5), abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1.0], [2.0])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# --- the command --------------------------------------------------------------------------------------------------

@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    """3 classes of 16 px random textures: 5 train and 3 val images each."""
    root = tmp_path / "data"
    for c in range(3):
        write_images(root / "train" / f"c{c}", 5, size=16, seed=10 + c)
        write_images(root / "val" / f"c{c}", 3, size=16, seed=20 + c)
    return root


@pytest.fixture
def encoders(tmp_path: Path) -> list[Path]:
    return [tiny_checkpoint(tmp_path / name / "encoder.safetensors", seed=seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))]


def _count_passes(monkeypatch) -> list[int]:
    """How many feature-extraction passes run (every extraction goes through features.iter_features)."""
    calls = []
    original = features.iter_features

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(features, "iter_features", counted)
    return calls


def test_end_to_end_table_files_and_the_random_init_row(labelled, encoders, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    passes = _count_passes(monkeypatch)
    result = runner.invoke(app, ["compare", str(encoders[0].parent), str(encoders[1]), "--random-init",
                                 "--data", str(labelled), *COMMON, "--out", str(out)])
    assert result.exit_code == 0, result.output
    # per encoder: the plain pass over train and val, rotations and patches of both probe splits = 6 passes
    assert len(passes) == 3 * 6
    saved = json.loads((out / "compare.json").read_text())
    assert saved["columns"] == ["knn", "linear", "rotation", "jigsaw", "colour-grid"]
    names = [r["name"] for r in saved["rows"]]
    assert names == ["a/encoder.safetensors", "b/encoder.safetensors", "a/encoder.safetensors (random init)"]
    twin = saved["rows"][2]
    assert twin["random_init"] and twin["weights"] == "random init"
    assert twin["checkpoint_sha256"] == checkpoint.file_digest(encoders[0])
    for row in saved["rows"]:
        assert row["input"]["image_size"] == 16 and row["input"]["std"] == [0.25] * 3
        assert 0 <= row["scores"]["knn"] <= 1 and 0 <= row["scores"]["rotation"] <= 1
        assert row["scores"]["colour-grid"] <= 1
        assert sorted(row["computed"]) == sorted(saved["columns"])
    for column in saved["columns"]:
        assert sorted(r["ranks"][column] for r in saved["rows"]) in ([1, 2, 3], [1, 2.5, 2.5], [1.5, 1.5, 3], [2, 2, 2])
    assert saved["spearman"]["encoders"] == 3 and "mean little" in saved["spearman"]["warning"]
    rho = saved["spearman"]["matrix"]
    assert len(rho) == 5 and all(rho[i][i] in (1.0, None) for i in range(5))
    assert saved["protocols"]["jigsaw"]["probe_train_images"] == 2000
    lines = list(csv.reader((out / "compare.csv").open()))
    assert lines[0][:5] == ["encoder", "file", "checkpoint_sha256", "input", "status"] and len(lines) == 4
    assert "16 px bilinear, mean 0.5/0.5/0.5, std 0.25/0.25/0.25" in result.output
    assert "Spearman" in result.output and f"written: {out / 'compare.json'}" in result.output
    from simclr_cli.engine import plots

    if plots.available():
        assert (out / "compare.png").stat().st_size > 0


@pytest.fixture
def no_plots(monkeypatch):
    """The end-to-end test draws compare.png; the others need not pay for matplotlib."""
    from simclr_cli.engine import plots

    monkeypatch.setattr(plots, "available", lambda: False)


def test_a_second_run_with_one_more_encoder_computes_only_its_row(labelled, encoders, tmp_path, monkeypatch, no_plots):
    out = tmp_path / "cmp"
    args = ["--data", str(labelled), "--tasks", "knn,rotation", *COMMON, "--out", str(out)]
    first = runner.invoke(app, ["compare", str(encoders[0]), str(encoders[1]), *args])
    assert first.exit_code == 0, first.output
    cached = {p: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    assert len(cached) == 4  # 2 encoders x 2 tasks
    passes = _count_passes(monkeypatch)
    second = runner.invoke(app, ["compare", str(encoders[0]), str(encoders[1]), str(encoders[2]), *args])
    assert second.exit_code == 0, second.output
    assert len(passes) == 4  # the new encoder only: plain train + val, rotated train + val
    saved = json.loads((out / "compare.json").read_text())
    assert [r["computed"] for r in saved["rows"]] == [[], [], ["knn", "rotation"]]
    assert all(p.stat().st_mtime_ns == t for p, t in cached.items())  # the old cells were read, not rewritten
    assert len(list((out / "cache").iterdir())) == 6


def test_an_unreadable_encoder_is_named_and_the_rest_runs(labelled, encoders, tmp_path, no_plots):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(encoders[0]), str(broken), "--data", str(labelled), "--tasks", "linear,jigsaw",
                                 *COMMON, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"failed: {broken}: " in result.output and "Traceback" not in result.output
    saved = json.loads((out / "compare.json").read_text())
    good, bad = saved["rows"]
    assert bad["failed"] and bad["scores"] == {"linear": None, "jigsaw": None} and bad["ranks"] == {"linear": None, "jigsaw": None}
    assert good["failed"] is None and good["ranks"] == {"linear": 1.0, "jigsaw": 1.0}
    assert "failed" in list(csv.reader((out / "compare.csv").open()))[2][4]


def test_an_unlabelled_folder_beside_labelled_data_gets_the_probes_only(labelled, encoders, tmp_path, no_plots):
    photos = tmp_path / "photos"
    write_images(photos, 10, size=16, seed=5)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(encoders[0]), "--data", str(labelled), "--data", str(photos),
                                 "--tasks", "knn,colour-grid", *COMMON, "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "compare.json").read_text())
    assert saved["columns"] == ["knn@data", "colour-grid@data", "knn@photos", "colour-grid@photos"]
    scores = saved["rows"][0]["scores"]
    assert scores["knn@photos"] is None and None not in (scores["knn@data"], scores["colour-grid@data"], scores["colour-grid@photos"])


@pytest.mark.parametrize(("args", "message"), [
    (["--tasks", "knn,colour"], "--tasks colour is not valid"),
    (["--data", "no-such-thing"], "neither a dataset name"),
])
def test_bad_input_is_one_line_and_exit_2(encoders, tmp_path, args, message):
    result = runner.invoke(app, ["compare", str(encoders[0]), *(["--data", "digits"] if "--data" not in args else []),
                                 *args, *COMMON, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_finetune_1pct_fine_tunes_on_one_label_per_class(labelled, encoders, tmp_path, monkeypatch, no_plots):
    from simclr_cli.engine.tasks import compare

    seen = {}
    real = compare.finetune_encoder

    def spy(cfg, model, info, subset, val, **kwargs):
        seen.update(images=len(subset), val=len(val), fraction=cfg.label_fraction, epochs=cfg.epochs)
        return real(replace(cfg, epochs=2), model, info, subset, val, **kwargs)  # the protocol's 300 steps, shortened

    monkeypatch.setattr(compare, "finetune_encoder", spy)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(encoders[0]), "--data", str(labelled), "--tasks", "finetune-1pct",
                                 *COMMON, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert seen == {"images": 3, "val": 9, "fraction": 0.01, "epochs": 300}  # 1% of 5 a class rounds up to 1
    row = json.loads((out / "compare.json").read_text())["rows"][0]
    assert 0 <= row["scores"]["finetune-1pct"] <= 1


def test_encoders_with_different_inputs_each_see_their_own_transform(labelled, encoders, tmp_path, no_plots, monkeypatch):
    from simclr_cli.engine.checkpoint import EncoderInfo, save_encoder
    from simclr_cli.engine.model import ModelConfig, build_model

    torch.manual_seed(4)
    cfg = ModelConfig(arch="resnet18", width=0.25).resolved(image_size=24)
    info = EncoderInfo(model=cfg, image_size=24, mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3), interpolation="bicubic",
                       config={}, epoch=1, step=1)
    wide = tmp_path / "wide.safetensors"
    save_encoder(wide, build_model(cfg), info=info)
    sides, real_encode = [], features.encode

    def spy(model, x, **kwargs):
        sides.append(tuple(x.shape[-2:]))
        return real_encode(model, x, **kwargs)

    monkeypatch.setattr(features, "encode", spy)
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", str(encoders[0]), str(wide), "--data", str(labelled), "--tasks", "jigsaw,colour-grid",
                                 *COMMON, "--out", str(out)])
    assert result.exit_code == 0, result.output
    small, large = json.loads((out / "compare.json").read_text())["rows"]
    assert (small["input"]["image_size"], small["input"]["mean"]) == (16, [0.5] * 3)
    assert (large["input"]["image_size"], large["input"]["mean"], large["input"]["interpolation"]) == (24, [0.4] * 3, "bicubic")
    assert all(row["scores"]["jigsaw"] is not None and row["scores"]["colour-grid"] is not None for row in (small, large))
    assert "24 px bicubic, mean 0.4/0.4/0.4, std 0.3/0.3/0.3" in result.output
    half = len(sides) // 2  # the first encoder's passes, then the second's
    assert set(sides[:half]) == {(16, 16)} and set(sides[half:]) == {(24, 24)}


# --- several processes --------------------------------------------------------------------------------------------

def test_two_processes_give_the_one_process_table_and_a_failed_row_stays_failed(labelled, encoders, tmp_path):
    """--gpus 2 --device cpu: every pass split at whole batches and gathered in order, so rank 0 fits every probe on
    the one-process features and the scores are equal bit for bit (both runs on one torch thread); an unreadable
    file is a failed row on both ranks while the others are scored; rank 0 alone prints and writes."""
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    # batches of 4: each rank gets rows of every pass (15 train, 9 val images; 3 and 9 views of each probe image)
    args = ["compare", str(encoders[0]), str(broken), "--random-init", "--data", str(labelled),
            *COMMON, "--batch-size", "4"]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = simclr_on_two_processes(*args, "--out", str(tmp_path / "two"))
    saved = [json.loads((tmp_path / run / "compare.json").read_text()) for run in ("one", "two")]
    assert [[r["scores"], r["ranks"], r["failed"]] for r in saved[0]["rows"]] == \
        [[r["scores"], r["ranks"], r["failed"]] for r in saved[1]["rows"]]
    good, bad, twin = saved[1]["rows"]
    assert bad["failed"] and all(v is None for v in bad["scores"].values())
    assert None not in (*good["scores"].values(), *twin["scores"].values())
    assert saved[0]["spearman"]["matrix"] == saved[1]["spearman"]["matrix"]
    assert two.stdout.count(f"written: {tmp_path / 'two' / 'compare.json'}") == 1  # rank 0 alone reports
    assert len(list((tmp_path / "two" / "cache").iterdir())) == 2 * 5  # 2 scored rows x 5 tasks, written once


def _rank_1_cannot_read_the_second(world, first: str, second: str, data: str, out: str) -> None:
    """compare.run on 2 ranks where only rank 1 fails to open `second`: both skip its row; rank 1 writes nothing."""
    from simclr_cli.engine.configs import CompareConfig
    from simclr_cli.engine.errors import CheckpointError
    from simclr_cli.engine.tasks import compare

    if world.rank == 1:
        real_open = compare.open_encoder

        def flaky(path, **kwargs):
            if str(path) == second:
                raise CheckpointError(f"{second}: unreadable on rank 1 only")
            return real_open(path, **kwargs)

        def no_writes(*args, **kwargs):
            raise AssertionError("rank 1 wrote a file")

        compare.open_encoder = flaky
        compare.write_json = compare.atomic_write = compare.plots.plot_compare = no_writes
    cfg = CompareConfig(data=(data,), tasks=("knn",), device="cpu", precision="fp32", workers=0,
                        batch_size=4, max_iter=30)
    done = compare.run(cfg, encoders=[Path(first), Path(second)], out=Path(out))
    if world.rank == 1:
        assert done is None
        return
    good, skipped = done.rows
    assert skipped.failed.startswith("another process of --gpus could not read it") and skipped.scores == {}
    assert good.failed is None and None not in good.scores.values()


def test_a_file_one_process_cannot_read_is_skipped_by_every_process(labelled, encoders, tmp_path):
    run_on_two_processes(_rank_1_cannot_read_the_second, str(encoders[0]), str(encoders[1]), str(labelled),
                         str(tmp_path / "cmp"), timeout_s=120)
