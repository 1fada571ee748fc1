"""The feature extractor: row order, layers, eval mode, random-init baseline (CPU, tiny checkpoints)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Subset

from multiprocess import run_on_two_processes
from simclr_cli.engine import features
from simclr_cli.engine.augment import eval_transform
from simclr_cli.engine.checkpoint import EncoderInfo, load_encoder, save_encoder
from simclr_cli.engine.device import Runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.model import ModelConfig, build_model
from simclr_cli.engine.report import NoProgress

CPU = Runtime(device=torch.device("cpu"), precision="fp32")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)




def tiny_checkpoint(path: Path, *, head_layers: int = 2, seed: int = 0) -> Path:
    """A resnet18 at width 0.25 (h: 128-d, z: 32-d) with non-trivial BN statistics, saved as an encoder file."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="resnet18", width=0.25, head_layers=head_layers, proj_dim=32).resolved(image_size=16)
    model = build_model(cfg)
    with torch.no_grad():  # random BN affine and running stats, so train mode and eval mode really differ
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    info = EncoderInfo(model=cfg, image_size=16, mean=MEAN, std=STD, interpolation="bilinear", config={}, epoch=1, step=3)
    save_encoder(path, model, info=info)
    return path


def images(count: int, *, seed: int = 0, size: int = 20) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def reference(path: Path, imgs: list[Image.Image], layer: str) -> torch.Tensor:
    """Each image alone through an independently loaded model in eval mode: the paper's h / head / z."""
    model, info = load_encoder(path)
    model.eval()
    transform = eval_transform(image_size=info.image_size, mean=info.mean, std=info.std, interpolation=info.interpolation)
    rows = []
    with torch.no_grad():
        for img in imgs:
            h = model.encoder(transform(img)[None])
            y = {"encoder": h, "projection": model.head(h)}.get(layer)
            if y is None:
                y = model.head(h, depth=int(layer[-1]))
            rows.append(y[0])
    return torch.stack(rows)


def test_rows_follow_image_order_and_match_a_per_image_forward(tmp_path):
    path = tiny_checkpoint(tmp_path / "enc.safetensors")
    encoder = features.open_encoder(path)
    imgs = images(7)
    out = features.extract(encoder, imgs, batch_size=3, rt=CPU)  # 3 + 3 + 1: a ragged last batch
    assert out.shape == (7, 128) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, reference(path, imgs, "encoder"), rtol=1e-4, atol=1e-5)


def test_labelled_items_give_the_same_features(tmp_path):
    encoder = features.open_encoder(tiny_checkpoint(tmp_path / "enc.safetensors"))
    imgs = images(4)
    bare = features.extract(encoder, imgs, batch_size=4, rt=CPU)
    labelled = features.extract(encoder, [(img, i % 2) for i, img in enumerate(imgs)], batch_size=2, rt=CPU)
    torch.testing.assert_close(bare, labelled)


@pytest.mark.parametrize(
    ("head_layers", "layer", "dim"),
    [(2, "encoder", 128), (2, "head1", 128), (2, "projection", 32), (3, "head1", 128), (3, "head2", 128), (3, "projection", 32)],
)
def test_layers_have_their_width_and_values(tmp_path, head_layers, layer, dim):
    path = tiny_checkpoint(tmp_path / "enc.safetensors", head_layers=head_layers)
    encoder = features.open_encoder(path)
    imgs = images(3)
    out = features.extract(encoder, imgs, layer=layer, batch_size=2, rt=CPU)
    assert features.layer_dim(encoder, layer) == dim and out.shape == (3, dim)
    torch.testing.assert_close(out, reference(path, imgs, layer), rtol=1e-4, atol=1e-5)


def test_head2_is_refused_on_a_two_layer_head(tmp_path):
    encoder = features.open_encoder(tiny_checkpoint(tmp_path / "enc.safetensors", head_layers=2))
    with pytest.raises(ConfigError, match="--layer head2 needs a 3-layer head; this checkpoint has 2"):
        features.extract(encoder, images(2), layer="head2", rt=CPU)
    with pytest.raises(ConfigError, match="--layer 'fc' is not one of encoder, head1, head2, projection"):
        features.layer_dim(encoder, "fc")


def test_extract_runs_in_eval_mode_and_changes_no_weight_or_statistic(tmp_path):
    encoder = features.open_encoder(tiny_checkpoint(tmp_path / "enc.safetensors"))
    assert not encoder.model.training
    encoder.model.train()  # even when a caller left it training, BN must use (and keep) its running statistics
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    features.extract(encoder, images(5), batch_size=5, rt=CPU)
    assert not encoder.model.training
    after = encoder.model.state_dict()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


def test_normalize_gives_unit_rows(tmp_path):
    encoder = features.open_encoder(tiny_checkpoint(tmp_path / "enc.safetensors"))
    raw = features.extract(encoder, images(4), rt=CPU)
    unit = features.extract(encoder, images(4), rt=CPU, normalize=True)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(unit, raw / raw.norm(dim=1, keepdim=True))


def test_random_init_has_fresh_weights_but_the_files_architecture_and_transform(tmp_path):
    path = tiny_checkpoint(tmp_path / "enc.safetensors", head_layers=3)
    trained = features.open_encoder(path)
    rng_before = torch.get_rng_state()
    baseline = features.open_encoder(path, random_init=True, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    again = features.open_encoder(path, random_init=True, seed=5)
    other = features.open_encoder(path, random_init=True, seed=6)

    assert baseline.source is None and trained.source == path
    assert not baseline.model.training
    for key in ("image_size", "mean", "std", "interpolation", "model"):
        assert getattr(baseline.info, key) == getattr(trained.info, key), key
    weight = "encoder.conv1.weight"
    state, file_state = baseline.model.state_dict(), trained.model.state_dict()
    assert state.keys() == file_state.keys()
    assert not torch.equal(state[weight], file_state[weight])
    assert torch.equal(state[weight], again.model.state_dict()[weight])  # the seed decides
    assert not torch.equal(state[weight], other.model.state_dict()[weight])
    out = features.extract(baseline, images(2), layer="head2", rt=CPU)
    assert out.shape == (2, 128)


class Recorder(NoProgress):
    def __init__(self):
        self.calls = []

    def start(self, *, total_steps, completed, description):
        self.calls.append(("start", total_steps))

    def update(self, stats):
        self.calls.append(("update", stats.step))

    def stop(self):
        self.calls.append(("stop",))


def test_iter_features_yields_consecutive_chunks_and_reports_progress(tmp_path):
    encoder = features.open_encoder(tiny_checkpoint(tmp_path / "enc.safetensors"))
    progress = Recorder()
    chunks = list(features.iter_features(encoder, images(5), batch_size=2, rt=CPU, progress=progress))
    assert [(start, len(chunk)) for start, chunk in chunks] == [(0, 2), (2, 2), (4, 1)]
    assert progress.calls == [("start", 3), ("update", 1), ("update", 2), ("update", 3), ("stop",)]


def test_reduced_precision_channels_last_path_still_returns_float32(tmp_path):
    encoder = features.open_encoder(tiny_checkpoint(tmp_path / "enc.safetensors"))
    imgs = images(3)
    exact = features.extract(encoder, imgs, rt=CPU)
    rt = Runtime(device=torch.device("cpu"), precision="bf16")
    assert rt.channels_last
    fast = features.extract(encoder, imgs, rt=rt)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert torch.nn.functional.cosine_similarity(fast, exact).min() > 0.98


def test_labels_of_reads_targets_subsets_and_falls_back_to_items():
    class WithTargets:
        targets = [2, 0, 1]

        def __len__(self):
            return 3

    pairs = [(None, 4), (None, 3)]
    assert features.labels_of(WithTargets()).tolist() == [2, 0, 1]
    assert features.labels_of(Subset(WithTargets(), [2, 0])).tolist() == [1, 2]
    assert features.labels_of(pairs).tolist() == [4, 3]


# ---------------------------------------------------------------------------------------------------------------
# two processes: each encodes its shard, every rank gets the one-process rows


def _two_rank_worker(world, checkpoint: str, expected_file: str) -> None:
    encoder = features.open_encoder(Path(checkpoint))
    expected = torch.from_numpy(np.load(expected_file))  # (10, 32): one process
    progress = Recorder()
    got = features.extract(encoder, images(10), layer="projection", batch_size=4, rt=CPU, progress=progress)
    assert torch.equal(got, expected)  # every rank, every row, bit for bit, in image order
    # Shards cut at whole batches, so each rank runs exactly one process's batches (a 5/5 split would not):
    # rank 0 rows 0-3, rank 1 rows 4-7 and 8-9.
    chunks = list(features.iter_features(encoder, images(10), layer="projection", batch_size=4, rt=CPU))
    mine = [(0, 4)] if world.rank == 0 else [(4, 4), (8, 2)]
    assert [(start, len(chunk)) for start, chunk in chunks] == mine
    for start, chunk in chunks:
        assert torch.equal(chunk, expected[start : start + len(chunk)])
    # Only rank 0 shows progress (its own batches).
    assert progress.calls == ([("start", 1), ("update", 1), ("stop",)] if world.is_main else [])
    one_image = features.extract(encoder, images(1), layer="projection", batch_size=2, rt=CPU)  # rank 0 has none
    assert torch.equal(one_image, torch.from_numpy(np.load(expected_file.replace(".npy", "_one.npy"))))
    # The passes with hooks (compare's map, cka's stages) shard and gather the same way, an empty rank included.
    expected_hooked = load_file(expected_file.replace(".npy", "_hooked.safetensors"))
    got = _hooked_passes(encoder)
    assert got.keys() == expected_hooked.keys()
    assert [name for name in got if not torch.equal(got[name], expected_hooked[name])] == []


def _hooked_passes(encoder: features.Encoder) -> dict[str, torch.Tensor]:
    """extract_with_map and cka's stage_features, on 10 images in batches of 4 and on 1 image (rank 0 gets none)."""
    from simclr_cli.engine import probes
    from simclr_cli.engine.tasks.cka import stage_features

    out = {}
    for count, batch, rows in ((10, 4, [1, 4, 5, 9]), (1, 2, [0])):
        h, maps = features.extract_with_map(encoder, images(count), rows=torch.tensor(rows), reduce=probes.grid_features,
                                            batch_size=batch, rt=CPU)
        out |= {f"h{count}": h, f"map{count}": maps}  # (N, D), (len(rows), 4, D)
        out |= {f"{name}{count}": x for name, x in stage_features(encoder, images(count), batch_size=batch, workers=0,
                                                                  rt=CPU).items()}
    return out


def test_two_ranks_extract_exactly_the_one_process_rows(tmp_path):
    path = tiny_checkpoint(tmp_path / "enc.safetensors")
    expected = features.extract(features.open_encoder(path), images(10), layer="projection", batch_size=4, rt=CPU)
    np.save(tmp_path / "expected.npy", expected.numpy())
    one_image = features.extract(features.open_encoder(path), images(1), layer="projection", batch_size=2, rt=CPU)
    np.save(tmp_path / "expected_one.npy", one_image.numpy())
    save_file(_hooked_passes(features.open_encoder(path)), str(tmp_path / "expected_hooked.safetensors"))
    run_on_two_processes(_two_rank_worker, str(path), str(tmp_path / "expected.npy"), timeout_s=120)
