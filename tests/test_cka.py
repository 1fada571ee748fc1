"""Linear CKA against the formula written naively (HSIC with the centring matrix H), and its stated invariances."""

from __future__ import annotations

import json
import math

import pytest
import torch

from simclr_cli.engine import cka


def naive_linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al. 2019 eq. 3 with linear kernels: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(KHLH)/(n-1)^2."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n  # H = I - 11^T/n

    def hsic(k, l):
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = x @ x.T, y @ y.T  # (n, n) Gram matrices
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def random_features(n: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64) + 3.0  # an offset, so centring matters


def test_matches_the_naive_formula():
    x, y = random_features(30, 7, 0), random_features(30, 12, 1)
    y = y + 0.5 * x @ random_features(7, 12, 2)  # related, so the value is far from 0
    assert cka.linear_cka(x, y) == pytest.approx(naive_linear_cka(x, y), rel=1e-10)
    assert cka.linear_cka(y, x) == pytest.approx(cka.linear_cka(x, y), rel=1e-12)


def test_a_representation_with_itself_is_one():
    x = random_features(25, 9, 3)
    assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = random_features(40, 6, 4), random_features(40, 6, 5)
    q, _ = torch.linalg.qr(random_features(6, 6, 6))  # (6, 6) orthogonal
    base = cka.linear_cka(x, y)
    assert cka.linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert cka.linear_cka(x, 7.5 * y) == pytest.approx(base, rel=1e-10)
    assert cka.linear_cka(x @ q, x) == pytest.approx(1.0, abs=1e-12)
    # ... but not to an arbitrary invertible linear map (the point of CKA over CCA, §2.1)
    stretch = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 0.1], dtype=torch.float64))
    assert cka.linear_cka(x @ stretch, x) < 0.99


def test_chunked_accumulation_equals_one_shot():
    x, y = random_features(103, 5, 7).float(), random_features(103, 8, 8).float()
    one_shot = cka.linear_cka(x, y, chunk_rows=1000)
    for chunk_rows in (1, 10, 64):
        assert cka.linear_cka(x, y, chunk_rows=chunk_rows) == pytest.approx(one_shot, rel=1e-12)
    assert torch.allclose(cka.centred_cross(x, y, chunk_rows=7), cka.centred_cross(x, y, chunk_rows=500), rtol=1e-12)


def test_matrix_holds_every_pair():
    a = {"one": random_features(20, 4, 9), "two": random_features(20, 3, 10)}
    b = {"p": random_features(20, 5, 11), "q": a["one"], "r": random_features(20, 2, 12)}
    m = cka.cka_matrix(a, b, chunk_rows=6)
    assert m.shape == (2, 3) and m.dtype == torch.float64
    for i, x in enumerate(a.values()):
        for j, y in enumerate(b.values()):
            assert float(m[i, j]) == pytest.approx(naive_linear_cka(x, y), rel=1e-10)
    assert float(m[0, 1]) == pytest.approx(1.0)


def test_constant_features_give_nan_and_bad_shapes_an_error():
    assert math.isnan(cka.linear_cka(torch.ones(5, 3), random_features(5, 2, 13)))
    with pytest.raises(ValueError, match="same n"):
        cka.linear_cka(torch.zeros(5, 3), torch.zeros(4, 3))


# --- `simclr cka` end to end ------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from conftest import write_images  # noqa: E402
from multiprocess import simclr_on_two_processes  # noqa: E402
from simclr_cli.cli import app  # noqa: E402
from simclr_cli.engine import checkpoint  # noqa: E402
from simclr_cli.engine.tasks.cka import STAGES  # noqa: E402
from test_knn import tiny_checkpoint  # noqa: E402

runner = CliRunner()
COMMON = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", "8"]


@pytest.fixture
def encoder_file(tmp_path: Path) -> Path:
    # not --random-init's seed 0, which would draw these very weights again
    return tiny_checkpoint(tmp_path / "run" / "encoder.safetensors", seed=123)


@pytest.fixture
def held_out(tmp_path: Path) -> Path:
    """A train/val folder whose val split holds 20 random-texture images (CKA reads no labels)."""
    root = tmp_path / "data"
    write_images(root / "train" / "x", 1, size=16, seed=3)
    write_images(root / "train" / "y", 1, size=16, seed=6)
    write_images(root / "val" / "x", 12, size=16, seed=4)
    write_images(root / "val" / "y", 8, size=16, seed=5)
    return root


def test_an_encoder_with_itself_has_ones_on_the_diagonal(encoder_file, held_out, tmp_path):
    result = runner.invoke(app, ["cka", str(encoder_file.parent), "--data", str(held_out), *COMMON, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert saved["stages"] == list(STAGES) == ["stem", "layer1", "layer2", "layer3", "h"]
    matrix = torch.tensor(saved["matrix"])  # (5, 5)
    assert torch.allclose(matrix.diagonal(), torch.ones(5), atol=1e-9)
    assert torch.allclose(matrix, matrix.T, atol=1e-9)  # A = B: CKA is symmetric
    assert saved["images"] == 20 and saved["data"] == str(held_out)
    digest = checkpoint.file_digest(encoder_file)
    for side in ("a", "b"):
        assert saved[side]["checkpoint"] == str(encoder_file.resolve()) and saved[side]["checkpoint_sha256"] == digest
        assert saved[side]["weights"] == "trained" and saved[side]["feature_dims"]["h"] == 128
    assert "global average pooling" in saved["pooling"]
    assert "layer3" in result.output and "1.000" in result.output and f"results: {tmp_path / 'out' / 'cka.json'}" in result.output
    from simclr_cli.engine import plots

    if plots.available():
        assert (tmp_path / "out" / "cka.png").stat().st_size > 0 and "heatmap: " in result.output


def test_against_the_random_init_twin_similarity_drops(encoder_file, held_out, tmp_path):
    result = runner.invoke(app, ["cka", str(encoder_file), "--random-init", "--data", str(held_out), "--max-images", "15",
                                 *COMMON, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "cka.json").read_text())
    matrix = torch.tensor(saved["matrix"])
    assert saved["images"] == 15
    assert (matrix.diagonal() < 1 - 1e-3).all() and (matrix >= 0).all()
    assert saved["a"]["weights"] == "trained" and saved["b"]["random_init"] and saved["b"]["checkpoint"] is None
    assert saved["b"]["checkpoint_sha256"] is None and saved["b"]["file"] == str(encoder_file.resolve())


def test_two_random_init_twins_of_one_file_differ(encoder_file, held_out, tmp_path):
    result = runner.invoke(app, ["cka", str(encoder_file), "--random-init-a", "--random-init", "--data", str(held_out),
                                 *COMMON, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "cka.json").read_text())
    assert saved["a"]["random_init"] and saved["b"]["random_init"]
    assert (torch.tensor(saved["matrix"]).diagonal() < 1 - 1e-3).all()  # A from seed + 1, B from seed


def test_stage_features_match_the_stages_computed_by_hand(encoder_file, held_out):
    from simclr_cli.engine.datasets import labelled_folder
    from simclr_cli.engine.device import Runtime
    from simclr_cli.engine.features import open_encoder, transform_for
    from simclr_cli.engine.tasks.cka import stage_features

    encoder = open_encoder(encoder_file)
    images = labelled_folder(held_out / "val")
    got = stage_features(encoder, images, batch_size=7, workers=0, rt=Runtime(device=torch.device("cpu"), precision="fp32"))
    x = torch.stack([transform_for(encoder)(images[i][0]) for i in range(3)])  # (3, 3, 16, 16)
    net = encoder.model.encoder
    with torch.no_grad():
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer1 = net.layer1(stem)
        layer3 = net.layer3(net.layer2(layer1))
        h = net(x)
    assert torch.allclose(got["stem"][:3], stem.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(got["layer1"][:3], layer1.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(got["layer3"][:3], layer3.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(got["h"][:3], h, atol=1e-5)
    assert all(len(net.layer1._forward_hooks) == 0 for net in [net])  # the hooks are removed


@pytest.mark.parametrize(("args", "message"), [
    (["--max-images", "1"], "cka.max_images"),
    (["--data", "no-such-thing"], "neither a dataset name"),
])
def test_bad_input_is_one_line_and_exit_2(encoder_file, held_out, args, message):
    result = runner.invoke(app, ["cka", str(encoder_file), *args, *COMMON])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_two_processes_give_the_one_process_matrix(encoder_file, held_out, tmp_path):
    """--gpus 2 --device cpu: each rank encodes a batch-aligned share of the 20 images (8 and 12), the stages are
    gathered in order, and rank 0's CKA is the one-process matrix, bit for bit (both on one torch thread)."""
    args = ["cka", str(encoder_file), "--random-init", "--data", str(held_out), *COMMON]
    one = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two = simclr_on_two_processes(*args, "--out", str(tmp_path / "two"))
    saved = [json.loads((tmp_path / run / "cka.json").read_text()) for run in ("one", "two")]
    assert saved[0]["matrix"] == saved[1]["matrix"] and saved[1]["images"] == 20
    assert two.stdout.count("results: ") == 1  # rank 0 alone reports
