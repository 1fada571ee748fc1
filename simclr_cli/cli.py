"""The `simclr` command line: each command parses options, resolves its config and calls one engine task.

torch is imported inside the commands, so `simclr --help` answers at once.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from simclr_cli import __version__, launcher, options
from simclr_cli.console import (RichProgress, console, errors_as_messages, results, setup_logging, show_matrix, show_table,
                                styled)

# Plain click-style help: this Typer's rich panels print a `<bool>` type beside every flag, --help included.
app = typer.Typer(
    name="simclr",
    help="SimCLR self-supervised pretraining of image encoders, and the tools to evaluate and use them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def examples(*lines: str) -> str:
    """A command's epilog: example command lines, kept as written (\b stops the help formatter re-wrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _version(value: bool) -> None:
    if value:
        results.print(f"simclr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """SimCLR (Chen et al. 2020) from the command line."""


@app.command(epilog=examples(
    "simclr pretrain                                  # the demo: digits, about 2 minutes on a 2-core CPU",
    "simclr pretrain ./photos --arch resnet18 --width 0.5 --image-size 32 --epochs 20",
    "simclr pretrain --resume                         # continue runs/latest after Ctrl-C",
))
def pretrain(
    data: Annotated[
        str | None,
        typer.Argument(help="A folder of images (searched recursively), or cifar10 | cifar100 | stl10 | imagenet | digits, "
                       "or tar shards: 'shards/shard-{000000..000146}.tar', a folder of .tar files (see simclr shard). "
                       "Omit it to train the demo on scikit-learn's bundled digits."),
    ] = None,
    preset: options.Preset = None,
    method: Annotated[str | None, typer.Option(help="The pretraining method: simclr (the default), moco-v1 or moco-v2 (their options: --set moco.K=, moco.m=, moco.T=; presets moco-v1, moco-v2), swav (its options: --set swav.nmb_prototypes= (3000; 1 per 10 images below 30,000), swav.epsilon= (0.05; 0.02 at <= 64 px), swav.sinkhorn_iterations= (3), swav.temperature= (0.1; 0.5 at <= 64 px), swav.nmb_crops= ([2, 6]; [2] at <= 64 px), swav.size_crops= (image size and 96/224 of it), swav.min_scale_crops= (augment.crop_scale's, then 0.05), swav.max_scale_crops= (augment.crop_scale's, then 0.14), swav.queue_length= (0: none), swav.queue_after_epochs= (15), swav.freeze_prototypes_epochs= (1); preset swav), pirl (--set pirl.negatives=, pirl.momentum=, pirl.T=, pirl.lam=; preset pirl).", show_default="simclr")] = None,
    arch: options.Arch = None,
    width: options.Width = None,
    sk_ratio: options.SkRatio = None,
    image_size: options.ImageSize = None,
    batch_size: options.BatchSize = None,
    epochs: options.Epochs = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps; the lr schedule is fitted to the shorter run.",
                                                  show_default="all the epochs' steps")] = None,
    lr: Annotated[float | None, typer.Option(help="BASE learning rate, scaled by --lr-scaling with the global batch. Default: 0.3 x B/256 (SGD at <= 64 px; LARS above, 4.8 at batch 4096); LARS at <= 64 px 1.0 x B/256 (the CIFAR recipe); 0.075 x sqrt(B) with --lr-scaling sqrt.")] = None,
    lr_scaling: Annotated[str | None, typer.Option(help="linear (lr x B/256) | sqrt (lr x sqrt(B), better for small batches).",
                                                   show_default="linear")] = None,
    optimizer: Annotated[str | None, typer.Option(help="lars (the paper's) | sgd | adamw.", show_default="sgd at <= 64 px, lars above")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="1e-6 in the SimCLR paper, 1e-4 in SimCLRv2.", show_default="5e-4 with sgd at <= 64 px, else 1e-6")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Linear warm-up length, capped at 10% of the run.",
                                                        show_default="0 with sgd at <= 64 px, else 10; the demo: 1")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="NT-Xent tau (--method simclr; MoCo's is moco.T, SwAV's swav.temperature, PIRL's pirl.T). Default: 0.5 at <= 64 px (the CIFAR recipe, best at small images and short runs), 0.1 above (ImageNet at batch 4096).")] = None,
    head_layers: Annotated[int | None, typer.Option(help="Projection head depth: 2 (SimCLR v1) or 3 (SimCLRv2); 1 is a linear head (MoCo v1).", show_default="2")] = None,
    proj_dim: Annotated[int | None, typer.Option(help="Output size of the projection head (128 in the paper).", show_default="128")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Save the training state every N steps (default: by --checkpoint-minutes).")] = None,
    checkpoint_minutes: Annotated[float | None, typer.Option(help="Without --checkpoint-every: save the training state at the first logged "
                                                             "step this many minutes after the last save (default 10; 0: only at the end). "
                                                             "A run also saves at its end and when stopped by Ctrl-C or SIGTERM.")] = None,
    init: options.Init = None,
    on_bad_image: options.OnBadImage = None,
    max_bad_fraction: options.MaxBadFraction = None,
    max_image_pixels: options.MaxImagePixels = None,
    file_list: options.FileList = None,
    subset: Annotated[int | None, typer.Option(help="Pretrain on N of the images, drawn with --seed (the same N on every process "
                                               "and on --resume): how an encoder changes with the amount of data.",
                                               show_default="all the images")] = None,
    unbalanced: Annotated[float | None, typer.Option(help="Labelled data only: a log-unbalanced draw of the classes. In an order "
                                                     "drawn with --seed, class r of C keeps n_r x ALPHA^(-r/(C-1)) of its n_r "
                                                     "images (at least 1): all of the first, 1/ALPHA of the last. Before --subset.",
                                                     metavar="ALPHA", show_default="balanced: every image")] = None,
    on_nonfinite: Annotated[str | None, typer.Option(help="abort (default): stop at a NaN/inf loss, saving nothing from that step on; "
                                                     "skip: drop that update and go on (at most train.max_skips in a row).")] = None,
    cache_gb: Annotated[float | None, typer.Option(help="This machine's memory for decoded images kept between epochs, in GB: one "
                                                   "cache in /dev/shm shared by its processes (default: half the free memory); "
                                                   "0 decodes every epoch.")] = None,
    compile_: options.Compile = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Also log metrics as TensorBoard events in <run>/tensorboard.",
                                                     show_default="--no-tensorboard")] = None,
    monitor_knn: Annotated[str | None, typer.Option(help="Labelled data (a dataset name, or a folder with train/ and val/) for a kNN "
                                                    "accuracy check during pretraining, logged to metrics.jsonl.", show_default="none")] = None,
    monitor_every: Annotated[int | None, typer.Option(help="Epochs between --monitor-knn checks (default 1; one also runs at the end).")] = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    set_: options.Set = None,
    out: options.Out = None,
    gpus: Annotated[int | None, typer.Option("--gpus", "--procs", help="Processes on this machine, one per GPU (with --device cpu: CPU processes "
                                             "over gloo). --batch-size stays the global batch.", show_default="1")] = None,
    nodes: Annotated[int, typer.Option(help="Machines taking part; run the same command on each with its --node-rank.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's index among --nodes (0 is the master).")] = 0,
    master_addr: Annotated[str | None, typer.Option(help="Address of node 0, for --nodes > 1.")] = None,
    master_port: Annotated[int | None, typer.Option(help="A free port on node 0, for --nodes > 1 (default 29500).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out (default runs/latest) from its newest valid checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a non-empty --out, replacing the previous run's files.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Pretrain a ResNet encoder with SimCLR on unlabelled images; writes encoder.safetensors in the run folder."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.errors import ConfigError
        from simclr_cli.engine.tasks import pretrain as task

        flags = {
            "model.arch": arch, "model.width": width, "model.head_layers": head_layers, "model.proj_dim": proj_dim,
            "model.sk_ratio": sk_ratio, "augment.image_size": image_size,
            "train.method": method, "train.batch_size": batch_size, "train.epochs": epochs, "train.max_steps": max_steps,
            "train.temperature": temperature, "train.checkpoint_every": checkpoint_every,
            "train.checkpoint_minutes": checkpoint_minutes, "train.seed": seed,
            "train.init": str(init) if init else None, "train.tensorboard": tensorboard,
            "train.device": device, "train.precision": precision,
            "optim.lr": lr, "optim.lr_scaling": lr_scaling, "optim.name": optimizer, "optim.weight_decay": weight_decay,
            "optim.warmup_epochs": warmup_epochs,
            "monitor.knn_data": monitor_knn, "monitor.every": monitor_every,
            "data.workers": workers, "data.on_bad_image": on_bad_image, "data.root": str(data_root) if data_root else None, "data.download": download,
            "data.max_bad_fraction": max_bad_fraction, "data.max_image_pixels": max_image_pixels, "data.cache_gb": cache_gb,
            "data.file_list": str(file_list) if file_list else None, "data.subset": subset, "data.unbalanced": unbalanced,
            "train.on_nonfinite": on_nonfinite, "train.compile": compile_,
        }
        if resume:
            out = config.resumed_run_folder(out)
        cfg = config.pretrain_config(data=data, preset=preset, sets=set_, flags=flags, resume_from=out if resume else None)
        procs = 1 if gpus is None else gpus
        if procs < 1 or nodes < 1 or not 0 <= node_rank < nodes:
            raise ConfigError("--gpus and --nodes must be >= 1 and --node-rank in 0..nodes-1 (no GPU: --device cpu)")
        if (procs > 1 or nodes > 1) and not launcher.launched_externally():
            code = launcher.launch_pretrain(cfg, out=out, resume=resume, overwrite=overwrite, verbose=verbose, procs=procs,
                                            nodes=nodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port)
            if code:
                raise typer.Exit(code)
            return
        result = task.run(cfg, out=out, resume=resume, overwrite=overwrite, progress=RichProgress())
        if result is not None:  # the main process reports
            _report_pretrain(result)


@app.command(epilog=examples(
    "simclr benchmark                                 # the digits, as pretrain would run them here",
    "simclr benchmark ./photos --arch resnet18 --image-size 64 --batch-size 64 --steps 5 --no-baseline",
))
def benchmark(
    data: Annotated[
        str | None,
        typer.Argument(help="The images to measure with, as for pretrain (a folder or a dataset name; default: the digits)."),
    ] = None,
    preset: options.Preset = None,
    arch: options.Arch = None,
    width: options.Width = None,
    image_size: options.ImageSize = None,
    batch_size: options.BatchSize = None,
    compile_: options.Compile = None,
    steps: Annotated[int, typer.Option(help="Timed steps of each measurement.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed steps before each measurement (allocator, caches, compilation).")] = 2,
    repeats: Annotated[int, typer.Option(help="Rounds of all measurements, interleaved; each figure is the median.")] = 1,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also measure the common peer setup (PIL transforms in "
                                           "DataLoader workers, fp32) on the same images.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    set_: options.Set = None,
    data_root: options.DataRoot = None,
    verbose: options.Verbose = False,
) -> None:
    """Measure pretraining speed: the model step alone, the full pretrain loop, the input pipeline per core, peak memory,
    and the same work done by a plain torchvision/PIL pipeline."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        import json

        from simclr_cli import config
        from simclr_cli.engine.tasks import benchmark as task

        flags = {
            "model.arch": arch, "model.width": width, "augment.image_size": image_size, "train.batch_size": batch_size,
            "train.compile": compile_, "train.device": device, "train.precision": precision, "data.workers": workers,
            "data.root": str(data_root) if data_root else None,
        }
        cfg = config.pretrain_config(data=data, preset=preset, sets=set_, flags=flags)
        result = task.run(cfg, steps=steps, warmup=warmup, repeats=repeats, baseline=baseline,
                          report=lambda text: console.print(f"measuring {text}", style="dim", highlight=False))
        if as_json:
            typer.echo(json.dumps(result.to_dict(), indent=2))
            return
        r = result
        rows = [
            ("setup", f"{r.arch} width {r.width:g}, {r.stem} stem, {r.image_size} px, batch {r.batch_size}, {r.precision} on {r.device}"
                      f"{', compiled' if r.compile else ''}; {r.images} images; {r.machine}"),
            ("model step (ready tensors)", f"{r.model_images_per_s:,.1f} images/s"),
            ("simclr pretrain", f"{r.pretrain_images_per_s:,.1f} images/s ({r.pretrain_vs_model:.0%} of the model step), "
                                f"data wait {r.data_wait_fraction:.1%}"),
            ("input pipeline, one core", f"{r.data_views_per_s_per_core:,.0f} views/s"),
            ("peak memory", f"{r.peak_rss_mb:,.0f} MB resident; {r.rss_growth_mb:+.1f} MB over the timed pretrain steps"),
        ]
        if r.baseline_pretrain_images_per_s is not None:
            rows += [
                (f"baseline step (PIL, {r.baseline_workers} workers, fp32)",
                 f"{r.baseline_pretrain_images_per_s:,.1f} images/s — simclr is {r.speedup_vs_baseline:.2f}x"),
                ("baseline input pipeline, one core",
                 f"{r.baseline_data_views_per_s_per_core:,.0f} views/s — simclr is {r.data_speedup_per_core:.2f}x"),
            ]
        show_table(f"benchmark: {r.warmup} warm-up + {r.steps} timed steps each, median of {r.repeats} round(s)", rows)


def _launched(gpus: int | None, device: str | None, *, add: list[str] | None = None) -> bool:
    """With --gpus N (and no launcher around us), run this same command in N worker processes and return True;
    otherwise False: this process does the work (joining the process group the environment describes)."""
    from simclr_cli.engine.errors import ConfigError

    procs = 1 if gpus is None else gpus
    if procs < 1:
        raise ConfigError(f"--gpus {procs} must be >= 1 (no GPU: --device cpu)")
    if procs == 1 or launcher.launched_externally():
        return False
    launcher.check_gpu_count(device or "auto", procs)
    code = launcher.launch([*sys.argv[1:], *(add or [])], procs=procs)
    if code:
        raise typer.Exit(code)
    return True


def _report_pretrain(result) -> None:
    """Where the encoder is, how the loss moved, and what to run next."""
    if result.already_complete:
        results.print(styled("already complete:", "bold green", f"{result.run_dir} finished all {result.steps} steps; nothing to resume"),
                      highlight=False)
        results.print(styled("encoder:", "bold", str(result.encoder)))
        return
    minutes = result.seconds / 60
    results.print(styled("done", "bold green", f"{result.steps} steps ({round(result.epochs_done, 1):g} epochs) in {minutes:.1f} min"))
    if result.first_loss is not None and result.last_loss is not None:
        results.print(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} (metrics in {result.run_dir / 'metrics.jsonl'})")
    results.print(styled("encoder:", "bold", str(result.encoder)))
    data = "" if result.named_data else " --data LABELLED_DATA"
    results.print("next: kNN accuracy, the same for an untrained encoder, linear evaluation, embeddings:")
    for command in (f"knn {result.encoder}{data}", f"knn {result.encoder}{data} --random-init",
                    f"linear-eval {result.encoder}{data}", f"embed IMAGES -o vecs.npy -c {result.encoder}"):
        results.print(f"  simclr {command}", highlight=False)


def _show_evaluation(done, *, title: str, rows: list[tuple[str, str]]) -> None:
    show_table(title, rows)
    results.print(f"results: {done.results_file}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _eval_flags(*, data, train, val, data_root, download, random_init, batch_size, workers, seed, device, precision) -> dict:
    """The options every labelled evaluation shares, as config keys (None: not given)."""
    return {"data": data, "train": str(train) if train else None, "val": str(val) if val else None,
            "data_root": str(data_root) if data_root else None, "download": download,
            "random_init": random_init or None, "batch_size": batch_size, "workers": workers, "seed": seed,
            "device": device, "precision": precision}


@app.command("linear-eval", epilog=examples(
    "simclr linear-eval                               # runs/latest on the data it was pretrained on",
    "simclr linear-eval runs/r50/encoder.safetensors --data cifar10 --data-root ~/data --protocol paper",
    "simclr linear-eval torchvision:resnet50=resnet50.pth --data ./labelled   # an ImageNet baseline",
))
def linear_eval(
    checkpoint: options.Checkpoint = None,
    data: options.Data = None,
    train: options.TrainDir = None,
    val: options.ValDir = None,
    protocol: Annotated[str | None, typer.Option(help="cached (default): a linear layer trained to convergence (L-BFGS) on features "
                                                 "computed once (fast, standard). paper: SimCLR's protocol, SGD with crop + flip "
                                                 "for 90/100 epochs.")] = None,
    layer: options.Layer = None,
    epochs: options.LinearEvalEpochs = None,
    lr: options.LinearEvalLr = None,
    batch_size: options.LinearEvalBatchSize = None,
    random_init: options.RandomInit = False,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    out: options.EvalOut = None,
    gpus: options.Procs = None,
    verbose: options.Verbose = False,
) -> None:
    """Linear evaluation: a linear classifier on the frozen encoder's features; reports top-1/top-5 on val."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.tasks import linear_eval as task

        flags = {"protocol": protocol, "layer": layer, "epochs": epochs, "lr": lr, **_eval_flags(
            data=data, train=train, val=val, data_root=data_root, download=download, random_init=random_init,
            batch_size=batch_size, workers=workers, seed=seed, device=device, precision=precision)}
        cfg = config.resolve_task("linear_eval", preset=preset, sets=set_, flags=flags)
        if _launched(gpus, cfg.device):
            return
        done = task.run(cfg, checkpoint=checkpoint, out=out, progress=RichProgress())
        if done is None:
            return
        r = done.result
        _show_evaluation(done, title=f"linear eval ({r.protocol}) on {done.data}", rows=[
            ("top-1", _pct(r.top1)), ("top-5", _pct(r.top5)),
            ("train / val images", f"{r.train_images} / {r.val_images}"), ("classifier", str(r.classifier)),
            ("confusion matrix", str(r.confusion_plot or "in results.json (install matplotlib for a picture)")),
        ])


@app.command(epilog=examples(
    "simclr knn -k 10,20,200                          # runs/latest on the data it was pretrained on",
    "simclr knn --index vecs.npy --query ./photos/cat.jpg -k 5",
))
def knn(
    checkpoint: options.Checkpoint = None,
    data: options.Data = None,
    train: options.TrainDir = None,
    val: options.ValDir = None,
    k: Annotated[str | None, typer.Option("-k", "--k", help="Neighbours, one or several in one pass: -k 10,20,200. "
                                          "Default 200 (20 below 10,000 training images), or 5 for retrieval.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="Vote weight exp(sim / T); the protocol uses 0.1.",
                                                      show_default="0.1")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Retrieval mode: a .npy written by `simclr embed`.")] = None,
    query: Annotated[Path | None, typer.Option("--query", help="Retrieval mode: an image or a folder of images to look up in --index.")] = None,
    layer: options.Layer = None,
    batch_size: options.ExtractBatchSize = None,
    random_init: options.RandomInit = False,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Evaluation: results folder (default <checkpoint folder>/eval/knn-<timestamp>/). "
                                             "Retrieval: a .csv or .json file for the matches (default: a table).")] = None,
    gpus: options.Procs = None,
    verbose: options.Verbose = False,
) -> None:
    """Weighted kNN accuracy of the encoder's features (Wu et al. 2018), or nearest-image retrieval with --index/--query."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.errors import ConfigError

        ks = _parse_ks(k)
        if (index is None) != (query is None):
            raise ConfigError("retrieval needs both --index VECS.npy and --query IMAGE_OR_DIR")
        if index is not None:
            from simclr_cli.engine.tasks import retrieval

            flags = {"k": ks[0] if ks else None, "layer": layer, "batch_size": batch_size, "workers": workers,
                     "device": device, "precision": precision}
            cfg = config.resolve_task("retrieval", preset=preset, sets=set_, flags=flags)
            if _launched(gpus, cfg.device):
                return
            matches = retrieval.run(cfg, index=index, query=query, checkpoint=checkpoint, out=out)
            if out is not None:
                results.print(f"matches: {out}")
                return
            for match in matches:
                show_table(f"nearest to {match.query}", [(m.path, f"{m.similarity:.4f}") for m in match.neighbours])
            return
        from simclr_cli.engine.tasks import knn as task

        flags = {"k": ks or None, "temperature": temperature, "layer": layer, **_eval_flags(
            data=data, train=train, val=val, data_root=data_root, download=download, random_init=random_init,
            batch_size=batch_size, workers=workers, seed=seed, device=device, precision=precision)}
        cfg = config.resolve_task("knn", preset=preset, sets=set_, flags=flags)
        if _launched(gpus, cfg.device):
            return
        done = task.run(cfg, checkpoint=checkpoint, out=out, progress=RichProgress())
        if done is None:
            return
        r = done.result
        rows = [(f"k={s.k_used}", f"top-1 {_pct(s.top1)}   top-5 {_pct(s.top5)}") for s in r.scores]
        rows.append(("train / val images", f"{r.train_images} / {r.val_images}"))
        _show_evaluation(done, title=f"kNN (T={r.temperature}) on {done.data}", rows=rows)


def _parse_ks(text: str | None) -> tuple[int, ...]:
    from simclr_cli.engine.errors import ConfigError

    if text is None:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"-k {text!r} is not a list of whole numbers; write e.g. -k 20 or -k 10,20,200") from None


@app.command(epilog=examples(
    "simclr cka --random-init                         # runs/latest against its untrained twin, on its data",
    "simclr cka runs/latest runs/demo-ft/finetuned.safetensors --data digits",
))
def cka(
    a: Annotated[Path | None, typer.Argument(metavar="A", help="Encoder A: an encoder.safetensors, a finetuned.safetensors, a run folder "
                                             "or an external ResNet (torchvision:resnet50=FILE). "
                                             "Default: runs/latest/encoder.safetensors.")] = None,
    b: Annotated[Path | None, typer.Argument(metavar="B", help="Encoder B, the same kinds. Default: A itself (with --random-init, A's "
                                             "untrained twin: what pretraining changed at each stage).")] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Whose held-out images: cifar10 | cifar100 | stl10 | imagenet "
                                             "| digits, or a folder with train/ and val/ (or test/). Default: A's pretraining "
                                             "data, if named. No labels are read.")] = None,
    max_images: Annotated[int | None, typer.Option(help="Use at most this many held-out images, drawn with --seed (default 10000).")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Make B the untrained twin of its file (torchvision's init): "
                                              "the baseline that shows which stages pretraining changed.")] = False,
    random_init_a: Annotated[bool, typer.Option("--random-init-a", help="Make A the untrained twin of its file (drawn from "
                                                "--seed + 1, so it differs from B's twin).")] = False,
    batch_size: options.ExtractBatchSize = None,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for cka.json and cka.png. Default: "
                                             "<A's folder>/eval/cka-<timestamp>/.")] = None,
    gpus: options.Procs = None,
    verbose: options.Verbose = False,
) -> None:
    """Linear CKA (Kornblith et al. 2019) between every stage of encoder A and every stage of encoder B: how similar
    their representations of the same images are (1 = the same up to rotation and scale)."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.tasks import cka as task

        flags = {"max_images": max_images, "random_init_a": random_init_a or None, **_eval_flags(
            data=data, train=None, val=None, data_root=data_root, download=download, random_init=random_init,
            batch_size=batch_size, workers=workers, seed=seed, device=device, precision=precision)}
        cfg = config.resolve_task("cka", preset=preset, sets=set_, flags=flags)
        if _launched(gpus, cfg.device):
            return
        done = task.run(cfg, a=a, b=b, out=out, progress=RichProgress())
        if done is None:
            return
        r = done.result
        show_matrix(f"linear CKA on {r.images} images of {r.data} (rows: A, columns: B)", corner="A \\ B",
                    columns=list(task.STAGES), rows=[(stage, [_cka_cell(v) for v in row]) for stage, row in zip(task.STAGES, r.matrix)])
        for side, described in (("A", r.a), ("B", r.b)):
            results.print(f"{side}: {described['file']}{' (random init)' if described['random_init'] else ''}")
        if done.heatmap is not None:
            results.print(f"heatmap: {done.heatmap}")
        results.print(f"results: {done.results_file}")


def _cka_cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"  # NaN: a stage without variance


@app.command(epilog=examples(
    "simclr compare runs/latest runs/demo-ft/finetuned.safetensors --random-init --data digits",
    "simclr compare runs/a runs/b --data ./labelled --data ./photos --tasks rotation,jigsaw,colour-grid",
))
def compare(
    encoders: Annotated[list[Path], typer.Argument(metavar="ENCODER...", help="Encoder files or run folders (encoder.safetensors, "
                                                   "finetuned.safetensors, a distilled student...) or external ResNets "
                                                   "(torchvision:resnet50=FILE), one row each.")],
    data: Annotated[list[str], typer.Option("--data", "-d", help="cifar10 | cifar100 | stl10 | imagenet | digits, a folder with "
                                            "train/ and val/ (or test/), or any folder of images (the probes only: no labels). "
                                            "Repeat it to compare on several.")],
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated: knn, linear, finetune-1pct (need labels; "
                                              "finetune-1pct trains each encoder, so it runs only when named), rotation, "
                                              "jigsaw, colour-grid (any images).",
                                              show_default="knn,linear,rotation,jigsaw,colour-grid")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Add the untrained twin of the first ENCODER as a row: "
                                              "the baseline that shows what training bought on each task.")] = False,
    batch_size: options.ExtractBatchSize = None,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for compare.json, compare.csv, compare.png and the cache of "
                                             "scores (rerun with one more ENCODER and only its row is computed).",
                                             show_default="runs/compare")] = None,
    gpus: options.Procs = None,
    verbose: options.Verbose = False,
) -> None:
    """Score several encoders on several tasks, each through its own input transform, in one table: kNN and linear
    accuracy on labelled data, and label-free probes of structure (rotation, jigsaw, colour-grid); ranks per task and
    the rank correlation between tasks (Kotar et al. 2021)."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.tasks import compare as task

        flags = {"data": list(data), "tasks": None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()],
                 "random_init": random_init or None, "data_root": str(data_root) if data_root else None,
                 "download": download, "batch_size": batch_size, "workers": workers, "seed": seed, "device": device,
                 "precision": precision}
        cfg = config.resolve_task("compare", preset=preset, sets=set_, flags=flags)
        if _launched(gpus, cfg.device):
            return
        done = task.run(cfg, encoders=list(encoders), out=out, progress=RichProgress())
        if done is None:
            return
        show_matrix(f"{len(done.rows)} encoders (score, rank within the task; 1 = best)", corner="encoder",
                    columns=["input", *done.columns],
                    rows=[(row.name, ["-" if row.input is None else f"{row.input['image_size']} px",
                                      *_compare_cells(row, done)]) for row in done.rows])
        for row in done.rows:
            results.print(f"{row.name}: " + (f"failed: {row.file}: {row.failed}" if row.failed else
                                               f"input {done.input_text(row)} (its own file's transform)"))
        if len(done.columns) >= 2:
            show_matrix("Spearman rank correlation between tasks, across encoders", corner="task", columns=done.columns,
                        rows=[(c, [_cka_cell(v) for v in line]) for c, line in zip(done.columns, done.correlation)])
        for path in (done.results_file, done.csv_file, done.heatmap):
            if path is not None:
                results.print(f"written: {path}")


def _compare_cells(row, done) -> list[str]:
    if row.failed:
        return ["failed"] * len(done.columns)
    cells = []
    for column in done.columns:
        value, rank = row.scores.get(column), done.ranks[column].get(row.name)
        cells.append("-" if value is None or rank is None else f"{value:.3f} ({rank:g})")
    return cells


@app.command(epilog=examples(
    "simclr finetune --label-fraction 0.1             # runs/latest on 10% of its data's labels",
    "simclr finetune runs/r50/encoder.safetensors --train ./labelled/train --val ./labelled/val",
))
def finetune(
    checkpoint: options.Checkpoint = None,
    data: options.Data = None,
    train: options.TrainDir = None,
    val: options.ValDir = None,
    label_fraction: Annotated[float | None, typer.Option(help="Class-balanced fraction of the training labels: 0.01 and 0.1 are "
                                                         "the paper's settings (default 1).")] = None,
    label_file: Annotated[Path | None, typer.Option(help="Train only on the images this file lists (one path a line, relative to the train "
                                                   "folder), e.g. the published ImageNet 1%/10% subsets.")] = None,
    from_head_layer: Annotated[int | None, typer.Option(help="0 (default): fine-tune from h (v1); 1: through the first projection-head "
                                                        "layer (SimCLRv2).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd (default; v1: Nesterov, 0.05 x B/256) | lars (v2: 0.005 x sqrt(B)).")] = None,
    init: options.Init = None,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", help="Passes over the labelled subset. Unset, a small subset gets "
                                               "more, up to finetune.min_steps steps in all (300).",
                                               show_default="60 at <= 1% labels, 30 above")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="BASE learning rate: x B/256 (sgd) or x sqrt(B) (lars).",
                                             show_default="0.05 (sgd), 0.005 (lars)")] = None,
    batch_size: options.FinetuneBatchSize = None,
    random_init: options.RandomInit = False,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    out: options.EvalOut = None,
    verbose: options.Verbose = False,
) -> None:
    """Fine-tune the whole encoder with a linear classifier on (a fraction of) the labels; evaluates as it goes."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.tasks import finetune as task

        flags = {"label_fraction": label_fraction, "label_file": str(label_file) if label_file else None,
                 "from_head_layer": from_head_layer, "optimizer": optimizer, "init": str(init) if init else None,
                 "epochs": epochs, "lr": lr, **_eval_flags(
                     data=data, train=train, val=val, data_root=data_root, download=download, random_init=random_init,
                     batch_size=batch_size, workers=workers, seed=seed, device=device, precision=precision)}
        cfg = config.resolve_task("finetune", preset=preset, sets=set_, flags=flags)
        done = task.run(cfg, checkpoint=checkpoint, out=out, progress=RichProgress())
        if done is None:
            return
        r = done.result
        _show_evaluation(done, title=f"fine-tuning on {done.data}", rows=[
            ("top-1", _pct(r.top1)), ("top-5", _pct(r.top5)),
            ("labelled / train images", f"{r.labelled_images} / {r.train_images}"),
            ("val images", str(r.val_images)), ("model", str(r.finetuned)),
        ])


@app.command(epilog=examples(
    "simclr distill runs/latest/finetune/finetuned.safetensors    # self-distillation on the teacher's pretraining data",
    "simclr distill teacher.safetensors ./unlabelled --student-arch resnet18 --val ./labelled",
))
def distill(
    teacher: Annotated[Path, typer.Argument(help="The fine-tuned teacher: a finetuned.safetensors written by `simclr finetune` "
                                            "(or a student of an earlier distill).")],
    data: Annotated[str | None, typer.Argument(help="Unlabelled images: a folder (searched recursively) or a dataset name, as "
                                               "for pretrain. Default: the teacher's pretraining data.")] = None,
    val: Annotated[str | None, typer.Option("--val", help="Labelled data evaluated every epoch (a dataset name, or a folder with "
                                            "train/ and val/). Default: DATA, when it is a named dataset.")] = None,
    student_arch: Annotated[str | None, typer.Option(help="The student's ResNet. Default: the teacher's (self-distillation).")] = None,
    student_width: Annotated[float | None, typer.Option(help="The student's width multiplier. Default: the teacher's.")] = None,
    student_sk_ratio: Annotated[float | None, typer.Option(help="The student's selective kernels (0 = none). Default: the teacher's.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="tau of both softmaxes; 1 (default) as the paper's "
                                                      "big-to-small students, 0.1 its self-distillation. Lower it (e.g. 0.5) for an unsure "
                                                      "teacher, whose flat softmax hides its argmax.")] = None,
    labels_weight: Annotated[float | None, typer.Option("--labels-weight", help="a in [0, 1): add the labels' cross-entropy as "
                                                        "(1 - a) distillation + a labels (eq. 3). Default 0: soft labels only.")] = None,
    label_fraction: Annotated[float | None, typer.Option(help="With --labels-weight: a class-balanced fraction of the --val data's "
                                                         "train labels. Default: the labels the teacher was fine-tuned on.")] = None,
    label_file: Annotated[Path | None, typer.Option(help="With --labels-weight: the labelled images, one path a line, relative to "
                                                    "the --val data's train folder.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="lars (default; v2: pretraining's 0.1 x sqrt(B)) | sgd (Nesterov, 0.1 x B/256).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", help="Passes over the unlabelled images (the paper's 400 by default).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="BASE learning rate: x sqrt(B) with lars (0.1, as pretraining in v2), x B/256 with sgd.",
                                         show_default="0.1 (lars)")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Unlabelled images per step (default 256; capped at the data).")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="The student encoder's starting weights (any --init file); default: random.")] = None,
    on_bad_image: options.OnBadImage = None,
    data_root: options.DataRoot = None,
    download: options.Download = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    seed: options.Seed = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    gpus: Annotated[int | None, typer.Option("--gpus", "--procs", help="Processes on this machine, one per GPU (CPU processes with "
                                            "--device cpu); --batch-size is the global batch.", show_default="1")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder. Default: runs/distill-<timestamp>/.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its newest checkpoint (one per epoch).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a non-empty --out.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Distil a fine-tuned teacher into a student on unlabelled images with its soft labels only (SimCLRv2 step 3)."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.tasks import distill as task

        flags = {"data": data, "val": val, "student_arch": student_arch, "student_width": student_width,
                 "student_sk_ratio": student_sk_ratio, "temperature": temperature, "labels_weight": labels_weight,
                 "label_fraction": label_fraction, "label_file": str(label_file) if label_file else None,
                 "optimizer": optimizer, "epochs": epochs,
                 "lr": lr, "batch_size": batch_size, "init": str(init) if init else None, "on_bad_image": on_bad_image,
                 "data_root": str(data_root) if data_root else None, "download": download, "device": device,
                 "precision": precision, "workers": workers, "seed": seed}
        cfg = config.resolve_task("distill", preset=preset, sets=set_, flags=flags)
        named_out = []
        if out is None and (gpus or 0) > 1 and not launcher.launched_externally():
            out = launcher.new_run_dir(prefix="distill-")
            named_out = ["--out", str(out)]  # one folder for all the workers
        if _launched(gpus, cfg.device, add=named_out):
            return
        r = task.run(cfg, teacher=teacher, out=out, resume_run=resume, overwrite=overwrite, progress=RichProgress())
        if r is None:  # a worker other than rank 0
            return
        show_table(f"distillation of {r.teacher.name} on {r.images} unlabelled images", [
            ("student top-1", _pct(r.top1)), ("student top-5", _pct(r.top5)),
            ("teacher top-1", _pct(r.teacher_top1)), ("val data", str(r.val or "-")), ("student", str(r.student)),
        ])


@app.command(epilog=examples(
    "simclr embed ./photos -o vecs.npy --normalize    # with runs/latest/encoder.safetensors",
    "simclr embed ./photos -o vecs.npy -c runs/r50/encoder.safetensors --plot",
    "simclr embed ./photos -o vecs.npy --resume    # continue a stopped or killed embed where it stopped",
))
def embed(
    folder: Annotated[Path, typer.Argument(help="A folder of images (searched recursively), or tar shards (rows keyed by sample key).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The N x D float32 .npy to write; VECS.paths.txt lists row i's image, VECS.json the settings.")],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="An encoder.safetensors, or an external ResNet "
                                                    "(torchvision:resnet50=FILE). Default: runs/latest/encoder.safetensors.")] = None,
    layer: options.Layer = None,
    normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="L2-normalise each row (cosine similarity becomes "
                                                   "a dot product).", show_default="--no-normalize")] = None,
    batch_size: options.ExtractBatchSize = None,
    device: options.Device = None,
    precision: options.Precision = None,
    workers: options.Workers = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished embed to --out (stopped or killed) from the "
                                         "rows it had written; give the same FOLDER, checkpoint and options.")] = False,
    plot: Annotated[bool | None, typer.Option("--plot/--no-plot", help="Also draw a 2-D map of the embeddings with image thumbnails "
                                              "(VECS.png; needs matplotlib).", show_default="--no-plot")] = None,
    plot_method: Annotated[str | None, typer.Option(help="pca (default) | tsne (scikit-learn) | umap (umap-learn) for --plot.")] = None,
    on_bad_image: options.OnBadImage = None,
    max_bad_fraction: options.MaxBadFraction = None,
    max_image_pixels: options.MaxImagePixels = None,
    file_list: options.FileList = None,
    preset: options.Preset = None,
    set_: options.Set = None,
    gpus: options.Procs = None,
    verbose: options.Verbose = False,
) -> None:
    """Encode every image of a folder into one row of a .npy (written incrementally and resumable with --resume;
    undecodable files are skipped and listed in VECS.bad_files.jsonl)."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.tasks import embed as task

        flags = {"layer": layer, "normalize": normalize, "batch_size": batch_size, "workers": workers, "device": device,
                 "precision": precision, "plot": plot, "plot_method": plot_method, "on_bad_image": on_bad_image,
                 "max_bad_fraction": max_bad_fraction, "max_image_pixels": max_image_pixels}
        cfg = config.resolve_task("embed", preset=preset, sets=set_, flags=flags)
        if _launched(gpus, cfg.device):
            return
        done = task.run(cfg, folder=folder, out=out, checkpoint=checkpoint, overwrite=overwrite, file_list=file_list,
                        resume=resume, progress=RichProgress())
        if done is None:
            return
        r = done.result
        if done.map is not None:
            results.print(f"map: {done.map}")
        show_table(f"embedded {folder}", [
            ("rows x dim", f"{r.rows} x {r.dim}"), ("vectors", str(r.out)), ("paths", str(r.paths_file)),
            ("skipped files", str(len(r.skipped))),
        ])


@app.command(epilog=examples(
    "simclr shard ./photos -o shards --shard-size 5000 --max-side 512",
    "simclr pretrain 'shards/shard-{000000..000009}.tar'",
))
def shard(
    folder: Annotated[Path, typer.Argument(help="A folder of images (searched recursively); class subfolders become KEY.cls labels.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for shard-000000.tar, shard-000001.tar, ...")],
    shard_size: Annotated[int, typer.Option("--shard-size", help="Samples per shard: a few thousand keeps each tar at a few hundred MB.")] = 1000,
    max_side: Annotated[int | None, typer.Option("--max-side", help="Shrink images whose longer side is over this many pixels (re-encoded); smaller ones are copied as they are.")] = None,
    max_image_pixels: options.MaxImagePixels = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace shards already in OUT.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Convert a folder of images to tar shards (WebDataset layout) that pretrain and embed read: convert once, train often."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli.engine.tasks import shard as task

        r = task.run(folder=folder, out=out, shard_size=shard_size, max_side=max_side, max_image_pixels=max_image_pixels,
                     overwrite=overwrite)
        show_table(f"sharded {folder}", [
            ("shards", f"{len(r.shards)} ({r.shards[0].name} .. {r.shards[-1].name})"), ("samples", str(r.samples)),
            ("re-encoded (over --max-side)", str(r.resized)), ("skipped files", str(len(r.skipped))),
            ("classes", str(len(r.classes)) if r.classes else "-"),
        ])
        results.print(f"pretrain on them with: simclr pretrain '{r.out}/shard-{{{0:06d}..{len(r.shards) - 1:06d}}}.tar'",
                      highlight=False)


@app.command(epilog=examples(
    "simclr export --to torchvision -o r50.safetensors  # runs/latest/encoder.safetensors",
    "simclr export runs/r50/encoder.safetensors --to onnx",
))
def export(
    to: Annotated[str, typer.Option("--to", help="torchvision (a state dict for torchvision.models.resnetXX: width 1, standard stem) | "
                                    "safetensors-encoder (the bare encoder, any variant) | onnx (image -> h; needs the onnx package).")],
    checkpoint: options.Checkpoint = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file. Default: beside the checkpoint, named after it and the target.")] = None,
    include_fc: Annotated[bool, typer.Option("--include-fc", help="torchvision: also write a fine-tuned classifier as fc.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Export the encoder's weights for use outside simclr (torchvision, plain safetensors, ONNX)."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        from simclr_cli import config
        from simclr_cli.engine.configs import ExportConfig
        from simclr_cli.engine.tasks import export as task

        cfg = config.typed(ExportConfig, {"to": to, "include_fc": include_fc}, where="export")
        result = task.run(cfg, checkpoint=checkpoint, out=out, overwrite=overwrite)
        show_table(f"exported {result.architecture} ({result.target})", [
            ("file", str(result.out)), ("tensors", str(result.tensors)), ("parameters", f"{result.parameters:,}"),
            ("missing when loaded", ", ".join(result.missing_keys) or "-"),
        ])
        results.print(f"load it with: {result.usage}", highlight=False)
        results.print(f"preprocess images: {result.preprocessing}", highlight=False)


@app.command(epilog=examples(
    "simclr info                                      # runs/latest/encoder.safetensors",
    "simclr info runs/r50/finetuned.safetensors --json",
))
def info(
    checkpoint: options.Checkpoint = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as JSON (including the training config).")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Describe a checkpoint: architecture, parameters, input transform, training progress, config and evaluations."""
    setup_logging(verbose=verbose)
    with errors_as_messages(verbose=verbose):
        import json

        from simclr_cli.engine.tasks import info as task

        described = task.run(checkpoint)
        if as_json:
            typer.echo(json.dumps(described.to_dict(), indent=2, default=str))
            return
        rows = [
            ("kind", described.kind),
            ("method", described.method),
            ("architecture", f"{described.architecture} width {described.width:g}, {described.stem} stem, "
                             + (f"selective kernels {described.sk_ratio:g}, " if described.sk_ratio else "")
                             + (f"{described.head_layers}-layer head -> {described.proj_dim}" if described.head_layers
                                else "no projection head")),
            ("parameters", f"{described.total_parameters:,} (encoder {described.encoder_parameters:,}, head {described.head_parameters:,})"),
            ("input", f"{described.image_size} px, {described.interpolation}, mean {list(described.mean)}, std {list(described.std)}"),
            ("preprocessing", described.preprocessing),
            ("trained", f"step {described.step}, epoch {described.epoch}"),
            ("data", str((described.config.get('data') or {}).get('source'))),
        ]
        rows += [(f"eval: {e.command}", "unreadable" if e.error else
                  f"{'random-init baseline: ' if e.baseline else ''}top-1 {_pct(e.top1)}, top-5 {_pct(e.top5)}")
                 for e in described.evaluations]
        show_table(str(described.path), rows)
