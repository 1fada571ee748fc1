"""The one feature extractor behind knn, linear-eval and embed: a frozen encoder in eval mode, no gradients.

Representations follow SimCLR §2.1 (h = f(x), z = g(h)) and SimCLRv2 §2 (the output of the head's
first layer, a better starting point than h for fine-tuning with few labels).

Under a process group (distributed.init) each rank encodes one contiguous, batch-aligned shard of the images
and `extract` gathers the rows, so every rank gets exactly the (N, D) tensor one process computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from simclr_cli.engine import checkpoint, distributed, external, rundir
from simclr_cli.engine.augment import eval_resize_side, eval_transform
from simclr_cli.engine.checkpoint import EncoderInfo
from simclr_cli.engine.device import MAX_WORKERS, Runtime
from simclr_cli.engine.errors import ConfigError
from simclr_cli.engine.images import decoded_at_least
from simclr_cli.engine.model import SimCLR, build_model
from simclr_cli.engine.report import NoProgress, Progress, StepStats

log = logging.getLogger("simclr")

# h; the output of head block 1 / 2 (SimCLRv2 §2: fine-tune from the head's middle); z
LAYERS = ("encoder", "head1", "head2", "projection")


@dataclass(frozen=True)
class Encoder:
    """A SimCLR network in eval mode, with what its file says about its input transform."""

    model: SimCLR
    info: EncoderInfo
    source: Path | None  # the checkpoint file, resolved (no runs/latest link); None for a random-init baseline
    spec: str | None = None  # an external encoder's `KIND:ARCH[@SIZE]=PATH` (PATH resolved); None for our own files

    @functools.cached_property
    def digest(self) -> str | None:
        """`sha256:<hex>` of the checkpoint file, computed once: what names these exact weights in results and indexes."""
        return None if self.source is None else checkpoint.file_digest(self.source)


def open_encoder(checkpoint_path: Path | str, *, random_init: bool = False, seed: int = 0) -> Encoder:
    """Load an encoder file, or a folder's (rundir.encoder_file), or a torchvision/timm ResNet named
    `KIND:ARCH[@SIZE]=PATH` (external.py); CheckpointError on problems. `random_init` keeps its architecture and
    transform but draws fresh weights from `seed`: the honest baseline every evaluation should be compared with."""
    spec = external.parse_spec(checkpoint_path)
    path = rundir.encoder_file(checkpoint_path) if spec is None else spec.path
    # A forked CPU generator: building a model draws init weights (even one about to be overwritten by
    # load_encoder), and opening a file should not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        model, info = checkpoint.load_encoder(path) if spec is None else external.load(spec)
        if not random_init:
            # resolved: `runs/latest` moves with every run, and what was measured must keep naming these weights
            return Encoder(model=model.eval(), info=info, source=path.resolve(),
                           spec=None if spec is None else f"{spec.name}={path.resolve()}")
        torch.default_generator.manual_seed(seed)
        # The baseline people mean: a standard untrained ResNet (torchvision's init), whatever init the file's run
        # started from; zero-initialised residual branches would make it a far weaker straw man.
        model = build_model(dataclasses.replace(info.model, zero_init_residual=False))
    model.eval()
    # Nothing of the file's training survives except the architecture and the input transform.
    info = dataclasses.replace(info, epoch=0, step=0, extra={}, extra_tensors={})
    return Encoder(model=model, info=info, source=None)


RANDOM_INIT = "random init (torchvision's: He-normal convs, every BN gamma 1; untrained)"


def weights_of(encoder: Encoder) -> str:
    """What an evaluation measured, for results.json: the file's trained weights, or the random-init baseline."""
    return RANDOM_INIT if encoder.source is None else "trained"


def check_layer(encoder: Encoder, layer: str) -> None:
    """ConfigError unless `layer` exists in this encoder (head2 needs a 3-layer SimCLRv2 head)."""
    if layer not in LAYERS:
        raise ConfigError(f"--layer {layer!r} is not one of {', '.join(LAYERS)}; encoder (h) is the usual choice")
    if layer != "encoder" and external.is_external(encoder.info):
        raise ConfigError(f"--layer {layer} needs a projection head; {external.name_of(encoder.info)} is a ResNet "
                          "without one: use --layer encoder (h, its pooled feature)")
    head_layers = len(encoder.model.head.layers)
    if layer == "head2" and head_layers < 3:
        raise ConfigError(
            f"--layer head2 needs a 3-layer head; this checkpoint has {head_layers} (use head1, encoder or projection)"
        )


def layer_dim(encoder: Encoder, layer: str) -> int:
    """Width of the features `extract` returns for `layer`."""
    check_layer(encoder, layer)
    if layer == "encoder":
        return encoder.model.encoder.out_dim
    if layer == "projection":
        return encoder.model.head.out_dim
    return encoder.model.head.in_dim  # hidden head blocks keep the encoder width (SimCLR §B.9)


def transform_for(encoder: Encoder) -> Callable[[Image.Image], Tensor]:
    """The checkpoint's own test-time transform (size, normalisation, interpolation from the file)."""
    info = encoder.info
    return eval_transform(image_size=info.image_size, mean=info.mean, std=info.std, interpolation=info.interpolation)


def decode_side_for(encoder: Encoder) -> int:
    """The short side `transform_for` resizes to: JPEGs are decoded at the smallest scale that still covers it."""
    return eval_resize_side(encoder.info.image_size)


def prepare(encoder: Encoder, rt: Runtime) -> SimCLR:
    """Put the model on the runtime's device (NHWC when that is the fast path) in eval mode; in place."""
    model = encoder.model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()  # BN uses its running statistics and never updates them


def encode(model: SimCLR, x: Tensor, *, layer: str, rt: Runtime, normalize: bool = False) -> Tensor:
    """Features of one batch x (B, 3, S, S) as float32 on the CPU (B, D); `prepare` the model first."""
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    with torch.inference_mode(), rt.autocast(), _out_of_memory_as_advice(x):
        x = x.to(rt.device, non_blocking=True, memory_format=memory_format)
        h = model.encoder(x)  # (B, out_dim)
        if layer == "encoder":
            y = h
        elif layer == "projection":
            y = model.head(h)  # z: (B, proj_dim)
        else:
            y = model.head(h, depth=int(layer[-1]))  # (B, out_dim)
    # Copied outside inference mode: callers get ordinary tensors they may modify in place.
    y = y.to("cpu", torch.float32, copy=True)
    return F.normalize(y, dim=1) if normalize else y


@contextlib.contextmanager
def _out_of_memory_as_advice(x: Tensor) -> Iterator[None]:
    """A batch too large for the memory of the device, as ConfigError saying so and what to lower."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:  # torch: OutOfMemoryError (CUDA), "DefaultCPUAllocator: not enough memory"
        text = str(exc)
        if not (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "not enough memory" in text
                or "can't allocate memory" in text):
            raise
        raise ConfigError(
            f"encoding a batch of {x.shape[0]} images of {x.shape[-1]} px ran out of memory; lower --batch-size"
        ) from None


class _Transformed(Dataset):
    """Item i of a dataset of PIL images or (PIL, label) pairs, as a transformed tensor (labels dropped)."""

    def __init__(self, images: Dataset, transform: Callable[[Image.Image], Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        item = self.images[index]
        image = item[0] if isinstance(item, tuple) else item
        return self.transform(image)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")


def local_rows(count: int, *, batch_size: int) -> range:
    """The rows of `count` this process encodes: all of them, or under a process group its contiguous shard,
    cut at whole batches so each rank runs exactly the batches one process would (identical rows, bit for bit)."""
    _check_batch_size(batch_size)
    return distributed.shard(count, distributed.current_world(), multiple_of=batch_size)


class RowShard:
    """This process's `local_rows` of an (N, D) float32 result, filled batch by batch with what `iter_features`
    yields (its `start` counts from image 0), then gathered in image order: every rank gets what one process makes."""

    def __init__(self, count: int, dim: int, *, batch_size: int) -> None:
        self.count = count
        self.rows = local_rows(count, batch_size=batch_size)
        self.data = torch.empty(len(self.rows), dim, dtype=torch.float32)  # (rows, D): this rank's shard

    def put(self, start: int, chunk: Tensor) -> None:
        self.data[start - self.rows.start : start - self.rows.start + len(chunk)] = chunk

    def gathered(self) -> Tensor:
        return distributed.gather_rows(self.data, self.count, distributed.current_world())  # (N, D)


def loader(dataset: Dataset, *, batch_size: int, workers: int, rt: Runtime, collate_fn=None) -> DataLoader:
    """Sequential batches (row order = dataset order) for feature extraction."""
    _check_batch_size(batch_size)
    if workers < 0:
        raise ConfigError(f"--workers {workers} must be >= 0; use 0 to load in the main process")
    if workers > MAX_WORKERS:
        raise ConfigError(f"--workers {workers} is more than {MAX_WORKERS}; use about one per CPU core")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        collate_fn=collate_fn,
    )


def iter_features(
    encoder: Encoder,
    images: Dataset,
    *,
    layer: str = "encoder",
    batch_size: int = 256,
    workers: int = 0,
    rt: Runtime,
    transform: Callable[[Image.Image], Tensor] | None = None,
    progress: Progress | None = None,
    normalize: bool = False,
    description: str = "features",
) -> Iterator[tuple[int, Tensor]]:
    """Yield (start, chunk): rows start..start+len(chunk) of the features, chunk (B, D) float32 on the CPU.

    Under a process group, only this rank's shard of the rows (`start` still counts from image 0), and only
    rank 0 reports progress.
    """
    check_layer(encoder, layer)
    if transform is None:  # the checkpoint's transform, whose resize a reduced decode covers
        images = decoded_at_least(images, decode_side_for(encoder))
    world = distributed.current_world()
    rows = local_rows(len(images), batch_size=batch_size)
    if world.world_size > 1:
        images = Subset(images, rows)
    if progress is None or not world.is_main:
        progress = NoProgress()
    batches = loader(_Transformed(images, transform or transform_for(encoder)), batch_size=batch_size, workers=workers, rt=rt)
    model = prepare(encoder, rt)
    started = time.perf_counter()
    start = rows.start
    progress.start(total_steps=len(batches), completed=0, description=description)
    try:
        for step, x in enumerate(batches, start=1):
            chunk = encode(model, x, layer=layer, rt=rt, normalize=normalize)
            yield start, chunk
            start += len(chunk)
            # The shards are balanced, so rank 0's rate times the ranks is the whole job's.
            rate = (start - rows.start) * world.world_size / max(time.perf_counter() - started, 1e-9)
            progress.update(StepStats(step=step, epoch=None, total_steps=len(batches), loss=None, lr=0.0, images_per_s=rate))
    finally:
        progress.stop()


def extract(
    encoder: Encoder,
    images: Dataset,
    *,
    layer: str = "encoder",
    batch_size: int = 256,
    workers: int = 0,
    rt: Runtime,
    transform: Callable[[Image.Image], Tensor] | None = None,
    progress: Progress | None = None,
    normalize: bool = False,
    description: str = "features",
) -> Tensor:
    """All features of `images` as one (N, D) float32 CPU tensor; row i is image i (on every rank of a process group)."""
    shard = RowShard(len(images), layer_dim(encoder, layer), batch_size=batch_size)
    for start, chunk in iter_features(
        encoder, images, layer=layer, batch_size=batch_size, workers=workers, rt=rt, transform=transform,
        progress=progress, normalize=normalize, description=description,
    ):
        shard.put(start, chunk)
    out = shard.gathered()  # (N, D)
    log.debug("extracted %s features (%s) from %d images", layer, tuple(out.shape), len(images))
    return out


def labels_of(dataset: Dataset) -> Tensor:
    """Integer labels (N,) of a dataset of (PIL, label) pairs, read from `targets` when it has them.

    Without `targets` every item is loaded once (decoding each image): slow on big folders.
    """
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(list(targets), dtype=torch.long)


def num_classes_of(train: Dataset, train_labels: Tensor, val_labels: Tensor) -> int:
    """The number of classes: the dataset's class list, or the largest label seen plus one."""
    classes = getattr(train, "classes", None)
    if classes is None and hasattr(train, "dataset"):  # a Subset
        classes = getattr(train.dataset, "classes", None)
    seen = int(torch.cat([train_labels, val_labels]).max()) + 1
    return max(len(classes), seen) if classes is not None else seen


def extract_with_map(
    encoder: Encoder,
    images: Dataset,
    *,
    rows: Tensor,
    reduce: Callable[[Tensor], Tensor],
    batch_size: int = 256,
    workers: int = 0,
    rt: Runtime,
    progress: Progress | None = None,
    description: str = "features",
) -> tuple[Tensor, Tensor]:
    """One pass: h (N, D) of every image, and for the images whose indices `rows` lists (sorted) the last stage's
    feature map (layer4's output, read by a forward hook) through `reduce` (B, C, H, W) -> (B, ...), stacked in that
    order, so no full map outlives its batch. Under a process group each rank runs its shard and both are gathered
    as in `extract`: every rank gets what one process computes. `reduce`'s output shape must not depend on H and W."""
    wanted = torch.zeros(len(images), dtype=torch.bool)
    wanted[rows] = True
    kept: list[Tensor] = []
    batch: dict[str, Tensor] = {}

    def hook(_module, _inputs, output: Tensor) -> None:
        batch["map"] = reduce(output).to("cpu", torch.float32, copy=True)

    dim = layer_dim(encoder, "encoder")
    h = RowShard(len(images), dim, batch_size=batch_size)
    handle = encoder.model.encoder.layer4.register_forward_hook(hook)
    try:
        for start, chunk in iter_features(encoder, images, layer="encoder", batch_size=batch_size, workers=workers,
                                          rt=rt, progress=progress, description=description):
            h.put(start, chunk)
            kept.append(batch["map"][wanted[start : start + len(chunk)]])
    finally:
        handle.remove()
    # A rank without a batch still sends a block of the right shape: what `reduce` makes of no maps.
    maps = torch.cat(kept) if kept else reduce(torch.zeros(0, dim, 1, 1)).float()
    return h.gathered(), distributed.gather_rows(maps, len(rows), distributed.current_world())
