"""Options shared by several commands, declared once as `Annotated` aliases.

Every tuning option defaults to None, meaning "not given": only what the user types overrides the preset. Its
`show_default` states the value that then applies, so `--help` shows every default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Preset = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="A recipe from presets/ by name (demo, cifar10, stl10, imagenet) or a YAML file. Flags override it.",
                 show_default="none; pretrain without DATA: demo"),
]
Set = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config value: --set augment.crop_scale=[0.2,1.0]. Repeatable; values are YAML."),
]
DataRoot = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder holding named datasets (cifar10, stl10, imagenet). Default: ~/.cache/simclr/datasets."),
]
Download = Annotated[
    bool | None,
    typer.Option("--download/--no-download", help="Download a named dataset into --data-root if missing (needs internet; not ImageNet).",
                 show_default="--no-download"),
]
Device = Annotated[
    str | None, typer.Option("--device", help="auto | cpu | cuda | mps. auto picks a GPU when there is one.", show_default="auto")
]
Precision = Annotated[
    str | None,
    typer.Option("--precision", help="auto | fp32 | bf16 | fp16. auto = bf16 where the hardware runs it natively, fp16 on older GPUs, else fp32.",
                 show_default="auto"),
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="GLOBAL batch of images (each gives 2 views). Larger batches mean more negatives.",
                             show_default="256 on a GPU, 64 on a CPU, at most the dataset; the demo: 128")
]
ExtractBatchSize = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="Images per forward pass while computing features (default 256); "
                             "lower it when memory runs out. The result does not depend on it.")
]
LinearEvalBatchSize = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="paper protocol: the classifier's training batch B (lr x B/256); "
                             "cached: images per forward pass while computing features. Default 256.")
]
FinetuneBatchSize = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="Labelled images per training step (the lr scales with it; capped at "
                             "the labelled subset), and per forward pass when evaluating.",
                             show_default="256, at most a quarter of the labelled subset")
]
Workers = Annotated[
    int | None, typer.Option("--workers", "-j", help="Data loading processes. Default: chosen from the machine (0 on 2-core CPUs).")
]
Seed = Annotated[int | None, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed for initialisation, data order and augmentations.",
                                          show_default="0")]
Epochs = Annotated[int | None, typer.Option("--epochs", "-e", help="Passes over the data; the schedule spans them.",
                                            show_default="100; the demo: 15")]
LinearEvalEpochs = Annotated[int | None, typer.Option("--epochs", "-e", help="paper protocol: passes over the labelled data.",
                                                      show_default="100 at <= 64 px, 90 above")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug messages and full tracebacks.")]
Out = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Run folder. Default: runs/<timestamp>/, with runs/latest pointing at the newest run."),
]
Checkpoint = Annotated[
    Path | None,
    typer.Argument(help="An encoder.safetensors (or a finetuned.safetensors), or a torchvision/timm ResNet state dict as "
                   "torchvision:resnet50=FILE (timm:ARCH[@SIZE]=FILE). Default: runs/latest/encoder.safetensors."),
]
Data = Annotated[
    str | None,
    typer.Option("--data", "-d", help="Labelled data: cifar10 | cifar100 | stl10 | imagenet | digits, or a folder with "
                 "train/ and val/ (or test/) class subfolders. Default: the dataset the encoder was pretrained on, if named."),
]
TrainDir = Annotated[Path | None, typer.Option("--train", help="A class-per-subfolder training folder (with --val).")]
ValDir = Annotated[Path | None, typer.Option("--val", help="A class-per-subfolder evaluation folder (with --train).")]
RandomInit = Annotated[
    bool,
    typer.Option("--random-init", help="Evaluate an untrained encoder of the same architecture with torchvision's standard init (He-normal convs, every BN gamma 1): the baseline that shows what pretraining bought."),
]
Layer = Annotated[
    str | None,
    typer.Option("--layer", help="encoder (h, the default) | head1 | head2 | projection (z). SimCLR evaluates h."),
]
EvalOut = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Folder for results.json and saved models. Default: <checkpoint folder>/eval/<command>-<timestamp>/."),
]
LinearEvalLr = Annotated[float | None, typer.Option("--lr", help="paper protocol: BASE learning rate, x B/256.", show_default="0.1")]
Procs = Annotated[
    int | None,
    typer.Option("--gpus", "--procs", help="Processes sharing the feature extraction (one per GPU; CPU processes with --device cpu). "
                 "The output is row for row what one process writes.", show_default="1"),
]
Init = Annotated[
    Path | None,
    typer.Option("--init", help="Start from these weights (not a resume): a simclr encoder, a torchvision/timm ResNet state dict, "
                 "or a converted official SimCLR v1/v2 checkpoint; .safetensors, or .pt/.pth loaded with weights_only=True."),
]
OnBadImage = Annotated[
    str | None,
    typer.Option("--on-bad-image", help="skip (default): leave out a file that cannot be decoded, naming it in the log and in "
                 "the bad-files report; error: stop at the first one."),
]
MaxBadFraction = Annotated[
    float | None,
    typer.Option("--max-bad-fraction", help="Stop when more than this fraction of the images cannot be decoded (default 0.5): "
                 "a mostly unreadable folder is the wrong folder or a broken disk, not noise. 1 never stops."),
]
MaxImagePixels = Annotated[
    int | None,
    typer.Option("--max-image-pixels", help="Refuse an image with more pixels than this, read from its header before decoding "
                 "(decompression-bomb guard; default 178956970, about 13,400 x 13,400). 0 turns the limit off."),
]
FileList = Annotated[
    Path | None,
    typer.Option("--file-list", help="Use the images this text file lists, one path a line (relative to the data folder, or "
                 "absolute), instead of searching the folder: for millions of files, list them once (e.g. with find). A "
                 "listed file that does not exist stops the command at once, naming it.",
                 show_default="none: search the folder"),
]
Arch = Annotated[str | None, typer.Option(help="resnet18 | resnet34 | resnet50 | resnet101 | resnet152.",
                                          show_default="resnet50; the demo: resnet18")]
Width = Annotated[float | None, typer.Option(help="Channel multiplier for every layer (SimCLR's R50 2x is --width 2).",
                                             show_default="1; the demo: 0.5")]
SkRatio = Annotated[float | None, typer.Option(help="Selective kernels (SimCLRv2): 0 = off; 0.0625 as in the paper's SK models, "
                                               "which also brings the ResNet-D stem and shortcuts.", show_default="0")]
ImageSize = Annotated[int | None, typer.Option(help="Training resolution. <= 64 px uses the CIFAR stem, weaker colour jitter and no blur.",
                                               show_default="224; 32 for CIFAR and digits, 96 for STL-10; the demo: 16")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model: faster steps after a compile of a "
                                              "minute or more; worth it for long runs.", show_default="--no-compile")]
