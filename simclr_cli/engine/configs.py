"""The typed config of every task: pretraining's, composed of the sections their blocks own (ModelConfig in model,
AugmentConfig in augment, OptimConfig in optim, DataConfig in pipeline, TrainConfig in trainer, MonitorConfig in
monitor) plus the `moco:` section of the MoCo methods, SwAV's `swav:` and PIRL's `pirl:`, and one per evaluation
or inference command.

Blocks never import this module: they take their own section. `simclr_cli/config.py` fills these from defaults,
presets, --set and flags; `defaults` fills their "auto" values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from simclr_cli.engine import badfiles
from simclr_cli.engine.augment import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, SMALL_IMAGE_MAX_SIZE, AugmentConfig
from simclr_cli.engine.errors import ConfigError, DataError, is_finite_number, is_whole_number
from simclr_cli.engine.features import LAYERS
from simclr_cli.engine.images import DEFAULT_MAX_PIXELS
from simclr_cli.engine.model import ModelConfig
from simclr_cli.engine.neighbours import DEFAULT_TEMPERATURE
from simclr_cli.engine.monitor import MonitorConfig
from simclr_cli.engine.optim import OptimConfig
from simclr_cli.engine.pipeline import DataConfig
from simclr_cli.engine.trainer import TrainConfig


# --- the MoCo methods' section (engine/methods/moco.py) ---------------------------------------------------------

MOCO_METHODS = ("moco-v1", "moco-v2")  # the methods that read the `moco:` section
MOCO_PAPER_K = 65536  # the queue of both papers (ImageNet)
MOCO_PAPER_T = {"moco-v1": 0.07, "moco-v2": 0.2}  # MoCo v1 §4; MoCo v2 Table 1


@dataclass
class MoCoConfig:
    """The `moco:` section, read by --method moco-v1 and moco-v2; the papers' names."""

    K: int | None = None  # queue length; None = 65,536, or on small data the largest multiple of the batch <= half the images
    m: float = 0.999  # key encoder momentum
    T: float | None = None  # InfoNCE temperature; None = 0.07 (moco-v1) or 0.2 (moco-v2)

    def validate(self) -> None:
        if self.K is not None and (not is_whole_number(self.K) or self.K < 1):
            raise ConfigError(f"moco.K {self.K!r} must be a whole number >= 1 (the papers use 65536), or unset")
        if not (is_finite_number(self.m) and 0 <= self.m < 1):
            raise ConfigError(f"moco.m {self.m!r} must be in [0, 1); the papers use 0.999")
        if self.T is not None and not (is_finite_number(self.T) and self.T > 0):
            raise ConfigError(f"moco.T {self.T!r} must be > 0; the papers use 0.07 (v1) or 0.2 (v2), or leave it unset")

    def resolved(self, *, method: str, num_images: int, batch_size: int) -> MoCoConfig:
        """K and T filled in for `method` on `num_images` images at global batch `batch_size`; raises when the
        queue cannot work on this data."""
        self.validate()
        K = self.K
        if K is None:
            K = min(MOCO_PAPER_K, max(batch_size, num_images // 2 // batch_size * batch_size))
            if K >= num_images:
                raise DataError(f"the data holds {num_images} images, too few for a MoCo queue of at least the batch "
                                f"({batch_size} keys) below the dataset size; lower --batch-size")
        elif K < batch_size:
            raise ConfigError(f"moco.K {K} is smaller than the global batch {batch_size}: every step enqueues "
                              f"{batch_size} keys; use K >= {batch_size}, or lower --batch-size")
        elif K >= num_images:
            raise DataError(f"moco.K {K} is not below the dataset size ({num_images} images): the queue would hold "
                            "each image's own earlier key as a negative; lower moco.K, or leave it unset to size it "
                            "from the data")
        return replace(self, K=K, T=MOCO_PAPER_T[method] if self.T is None else self.T)


# --- SwAV's section (engine/methods/swav.py) ------------------------------------------------------------------------

SWAV_METHODS = ("swav",)  # the methods that read the `swav:` section
SWAV_PAPER_PROTOTYPES = 3000  # §4 (ImageNet)
SWAV_IMAGES_PER_PROTOTYPE = 10  # below 30,000 images: about one prototype per ten images, at least 10
SWAV_MIN_PROTOTYPES = 10
SWAV_SMALL_CROP = 96 / 224  # the small crops' side as a share of the large ones' (§3.2: 96 and 224 px)
SWAV_PAPER_CROPS, SWAV_SMALL_IMAGE_CROPS = (2, 6), (2,)  # multi-crop (§3.2); at <= 64 px two crops (with_sizes)
SWAV_SMALL_CROP_SCALE = (0.05, 0.14)  # the small crops' area range (§3.2); the large ones' is augment.crop_scale
SWAV_PAPER_TEMPERATURE, SWAV_SMALL_IMAGE_TEMPERATURE = 0.1, 0.5  # eq. 2's tau: the paper's, and at <= 64 px
SWAV_PAPER_EPSILON, SWAV_SMALL_IMAGE_EPSILON = 0.05, 0.02  # Sinkhorn-Knopp's entropy weight: the paper's, and at <= 64 px


@dataclass
class SwAVConfig:
    """The `swav:` section, read by --method swav; the official code's names (main_swav.py)."""

    nmb_prototypes: int | None = None  # K; None = 3,000, or on fewer than 30,000 images one per ten images (>= 10)
    epsilon: float | None = None  # Sinkhorn-Knopp's entropy weight (§3.1); None = 0.05, 0.02 at <= 64 px (with_sizes)
    sinkhorn_iterations: int = 3
    temperature: float | None = None  # of the softmax over the prototype scores (eq. 2); None = 0.1, 0.5 at <= 64 px
    nmb_crops: tuple[int, ...] | None = None  # crops per group, the first group's get codes; None = [2, 6], [2] at <= 64 px
    size_crops: tuple[int, ...] | None = None  # each group's side; None = augment.image_size, then round(S * 96 / 224) (>= 8)
    min_scale_crops: tuple[float, ...] | None = None  # each group's crop area range; None = augment.crop_scale for the
    max_scale_crops: tuple[float, ...] | None = None  # first group, the paper's 5-14% for the others
    queue_length: int = 0  # past features added to the Sinkhorn (small batches: 3840 at batch 256); 0 = no queue
    queue_after_epochs: int = 15  # the queue fills from then on (official epoch_queue_starts), used once full
    freeze_prototypes_epochs: int = 1  # the prototypes get no update in these first epochs

    def validate(self) -> None:
        if self.nmb_prototypes is not None and (not is_whole_number(self.nmb_prototypes) or self.nmb_prototypes < 1):
            raise ConfigError(f"swav.nmb_prototypes {self.nmb_prototypes!r} must be a whole number >= 1 (the paper uses 3000), or unset")
        for name, example in (("epsilon", "0.05"), ("temperature", "0.1")):
            value = getattr(self, name)
            if value is not None and not (is_finite_number(value) and value > 0):
                raise ConfigError(f"swav.{name} {value!r} must be > 0; the paper uses {example}")
        for name, low in (("sinkhorn_iterations", 1), ("queue_length", 0), ("queue_after_epochs", 0), ("freeze_prototypes_epochs", 0)):
            value = getattr(self, name)
            if not is_whole_number(value) or value < low:
                raise ConfigError(f"swav.{name} {value!r} must be a whole number >= {low}")
        if self.nmb_crops is not None and not (self.nmb_crops and all(is_whole_number(c) and c >= 1 for c in self.nmb_crops)
                                               and sum(self.nmb_crops) >= 2):
            raise ConfigError(f"swav.nmb_crops {list(self.nmb_crops)!r} must be crops per group, each >= 1 and at least 2 in "
                              "all (the paper: [2, 6]), or unset")
        groups = len(self.nmb_crops if self.nmb_crops is not None else SWAV_PAPER_CROPS)
        for name in ("size_crops", "min_scale_crops", "max_scale_crops"):
            value = getattr(self, name)
            if value is not None and self.nmb_crops is None:
                raise ConfigError(f"swav.{name} gives one value per crop group: set swav.nmb_crops too (e.g. "
                                  f"--set swav.nmb_crops=[2,6]), since unset it follows the image size")
            if value is not None and len(value) != groups:
                raise ConfigError(f"swav.{name} {list(value)!r} must give one value per crop group, as swav.nmb_crops "
                                  f"{list(self.nmb_crops)!r} does")
        if self.size_crops is not None and not all(is_whole_number(s) and MIN_IMAGE_SIZE <= s <= MAX_IMAGE_SIZE for s in self.size_crops):
            raise ConfigError(f"swav.size_crops {list(self.size_crops)!r} must be sides in pixels from {MIN_IMAGE_SIZE} to "
                              f"{MAX_IMAGE_SIZE} (the paper: [224, 96]), or unset")
        if self.min_scale_crops is None or self.max_scale_crops is None:
            return  # the ranges are checked once with_sizes has filled them in
        for low, high in zip(self.min_scale_crops, self.max_scale_crops):
            if not (is_finite_number(low) and is_finite_number(high) and 0 < low <= high <= 1):
                raise ConfigError(f"swav.min_scale_crops {list(self.min_scale_crops)!r} and max_scale_crops "
                                  f"{list(self.max_scale_crops)!r} must be area shares 0 < min <= max <= 1 (the paper: "
                                  "[0.14, 0.05] and [1, 0.14])")

    def with_sizes(self, *, image_size: int, crop_scale: tuple[float, float] = AugmentConfig.crop_scale) -> SwAVConfig:
        """What follows the view size and augment.crop_scale filled in: the crop groups, their sides (the first at the
        image size, the others as 96 is to 224, §3.2) and area ranges (the first group's is augment.crop_scale, the
        others' the paper's 5-14%), the temperature and epsilon.

        At <= 64 px (measured on the demo: the digits at 16 px, batch 128, 210 steps; README "Other methods: SwAV")
        the paper's recipe collapses: every z turns to one direction (mean cosine between images 0.35 -> 0.98 in 50
        steps), the codes go uniform and the loss sits at log K. Three changes stop it, each needed: two crops, as
        solo-learn's CIFAR recipe (6 more crops of 8 px from 5-14% of a 16 px digit carry no signal, and predicting
        the codes from them pushes every prediction to the uniform average); epsilon 0.02, so that the codes of
        the untrained network are sharp (mean largest code 0.32 where 0.05 gives 0.09) and pull each view towards its
        partner's prototype; temperature 0.5, so that the prediction's softmax starts flat and its gradient is that
        pull, not a push of all predictions towards the uniform marginal. With any one of them at the paper's value
        and the other two changed, the mean cosine rose instead of falling (0.44-0.67 by step 40; with all three it
        fell to 0.01 and the loss went below log K)."""
        small_images = image_size <= SMALL_IMAGE_MAX_SIZE
        crops = self.nmb_crops
        if crops is None:
            crops = SWAV_SMALL_IMAGE_CROPS if small_images else SWAV_PAPER_CROPS
        sizes = self.size_crops
        if sizes is None:
            sizes = (image_size,) + (max(MIN_IMAGE_SIZE, round(image_size * SWAV_SMALL_CROP)),) * (len(crops) - 1)
        crop_scale = tuple(crop_scale)
        scales = {}  # min_scale_crops, max_scale_crops
        for end, name in enumerate(("min_scale_crops", "max_scale_crops")):
            given = getattr(self, name)
            if given is None:
                scales[name] = (crop_scale[end],) + (SWAV_SMALL_CROP_SCALE[end],) * (len(crops) - 1)
                continue
            # a crop_scale left at its default says nothing; one that was set must not be silently overridden
            if crop_scale != tuple(AugmentConfig.crop_scale) and given[0] != crop_scale[end]:
                raise ConfigError(f"augment.crop_scale {list(crop_scale)!r} and swav.{name} {list(given)!r} disagree on the "
                                  f"large crops' {name[:3]} scale ({crop_scale[end]} vs {given[0]}): leave swav.{name} "
                                  f"unset to use augment.crop_scale, or make its first value {crop_scale[end]}")
            scales[name] = tuple(given)
        temperature, epsilon = self.temperature, self.epsilon
        if temperature is None:
            temperature = SWAV_SMALL_IMAGE_TEMPERATURE if small_images else SWAV_PAPER_TEMPERATURE
        if epsilon is None:
            epsilon = SWAV_SMALL_IMAGE_EPSILON if small_images else SWAV_PAPER_EPSILON
        return replace(self, nmb_crops=tuple(crops), size_crops=tuple(sizes), temperature=temperature, epsilon=epsilon,
                       **scales)

    def resolved(self, *, method: str, num_images: int, batch_size: int) -> SwAVConfig:
        """The number of prototypes filled in for `num_images` images; raises when the queue does not hold whole
        global batches of `batch_size`."""
        self.validate()
        K = self.nmb_prototypes
        if K is None:
            K = min(SWAV_PAPER_PROTOTYPES, max(SWAV_MIN_PROTOTYPES, num_images // SWAV_IMAGES_PER_PROTOTYPE))
        if self.queue_length % batch_size:
            raise ConfigError(f"swav.queue_length {self.queue_length} is not a multiple of the global batch {batch_size}: "
                              f"the queue holds whole batches; use e.g. {max(1, self.queue_length // batch_size) * batch_size}")
        return replace(self, nmb_prototypes=K)


# --- PIRL's section (engine/methods/pirl.py) ----------------------------------------------------------------------

PIRL_METHODS = ("pirl",)  # the methods that read the `pirl:` section
PIRL_PAPER_NEGATIVES = 32000  # N of eq. 4 in the paper's ImageNet runs (§4)
PIRL_PAPER_T, PIRL_SMALL_IMAGE_T = 0.07, 0.2  # tau of eq. 3: the paper's, and the one that trains at <= 64 px


@dataclass
class PIRLConfig:
    """The `pirl:` section, read by --method pirl; the paper's values."""

    negatives: int | None = None  # N negatives drawn from the bank each step; None = 32,000, or on small data half the images
    momentum: float = 0.5  # the memory bank's: m_I <- momentum m_I + (1 - momentum) f(v_I), then unit length (§3.2)
    T: float | None = None  # tau of h (eq. 3); None = the paper's 0.07 above 64 px, 0.2 at <= 64 px (with_sizes)
    lam: float = 0.5  # lambda of eq. 5: the jigsaw term's weight, 1 - lambda the image term's
    bank_size: int | None = None  # rows of the memory bank, one per image: filled in from the data (leave unset)

    def validate(self) -> None:
        if self.negatives is not None and (not is_whole_number(self.negatives) or self.negatives < 1):
            raise ConfigError(f"pirl.negatives {self.negatives!r} must be a whole number >= 1 (the paper uses 32000), or unset")
        if not (is_finite_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"pirl.momentum {self.momentum!r} must be in [0, 1); the paper uses 0.5")
        if self.T is not None and not (is_finite_number(self.T) and self.T > 0):
            raise ConfigError(f"pirl.T {self.T!r} must be > 0; the paper uses 0.07, or leave it unset")
        if not (is_finite_number(self.lam) and 0 <= self.lam <= 1):
            raise ConfigError(f"pirl.lam {self.lam!r} must be in [0, 1]; the paper uses 0.5 (1 trains on the jigsaw term alone)")
        if self.bank_size is not None and (not is_whole_number(self.bank_size) or self.bank_size < 2):
            raise ConfigError(f"pirl.bank_size {self.bank_size!r} is the number of images; leave it unset")

    def with_sizes(self, *, image_size: int) -> PIRLConfig:
        """T filled in for the view size: the paper's 0.07 on ImageNet-sized views; at <= 64 px 0.2, because on the
        demo's 16 px digits the image-vs-bank term diverges at 0.07 (seed 1: loss 7.9 -> 1,900 in 210 steps with
        LARS, whose unscaled 1-D parameters, f's head BN and bias, grew from norm 51 to 611; 8.5 -> 160 in 38 steps
        with the paper's SGD 0.03 x B/256). The bank's rows, averages of f, start out alike, and each of the N = 898
        negatives weighs h/T in the gradient. At 0.2 the loss stays between 8 and 11 and seeds 0-2 beat the untrained
        network on linear evaluation (95.4% mean vs 94.2%; README, "Methods side by side")."""
        if self.T is not None:
            return self
        return replace(self, T=PIRL_PAPER_T if image_size > SMALL_IMAGE_MAX_SIZE else PIRL_SMALL_IMAGE_T)

    def resolved(self, *, method: str, num_images: int, batch_size: int) -> PIRLConfig:
        """negatives and bank_size filled in for `num_images` images; raises when they cannot work on this data."""
        self.validate()
        if self.bank_size is not None and self.bank_size != num_images:
            raise DataError(f"pirl.bank_size {self.bank_size} is not the number of images ({num_images}): the bank "
                            "holds one row per image; leave it unset")
        negatives = self.negatives
        if negatives is None:
            negatives = min(PIRL_PAPER_NEGATIVES, max(1, num_images // 2))
        elif negatives >= num_images:
            raise DataError(f"pirl.negatives {negatives} is not below the number of images ({num_images}): they are "
                            "drawn from a bank of one row per image; lower pirl.negatives, or leave it unset")
        return replace(self, negatives=negatives, bank_size=num_images)


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run; saved resolved with every output."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)  # read by --method moco-v1 / moco-v2 only
    swav: SwAVConfig = field(default_factory=SwAVConfig)  # read by --method swav only
    pirl: PIRLConfig = field(default_factory=PIRLConfig)  # read by --method pirl only

    def validate(self) -> None:
        for section in (self.data, self.model, self.augment, self.optim, self.train, self.monitor):
            section.validate()
        for section in METHOD_SECTIONS:
            getattr(self, section).validate()
        self.check_method_options()

    def reads_nt_xent_temperature(self) -> bool:
        """Whether the method reads train.temperature (NT-Xent's tau): those with a section of their own (METHOD_SECTIONS)
        have their temperature there."""
        return not any(self.train.method in readers for readers in METHOD_SECTIONS.values())

    def with_method_settings(self, *, num_images: int) -> PretrainConfig:
        """The method's own auto settings filled in, once the data's size and the global batch are known."""
        for section, readers in METHOD_SECTIONS.items():
            if self.train.method in readers:
                settings = getattr(self, section).resolved(method=self.train.method, num_images=num_images,
                                                           batch_size=self.train.batch_size)
                return replace(self, **{section: settings})
        return self

    def check_method_options(self) -> None:
        """Settings the chosen method does not read are refused, not silently ignored."""
        method = self.train.method
        if self.train.temperature is not None and not self.reads_nt_xent_temperature():
            own = next(section for section, readers in METHOD_SECTIONS.items() if method in readers)
            tau = "T" if hasattr(getattr(self, own), "T") else "temperature"  # moco.T, swav.temperature
            raise ConfigError(f"train.temperature is NT-Xent's (--method simclr); {method} "
                              f"reads {own}.{tau} instead (e.g. --set {own}.{tau}=0.2), so leave train.temperature unset")
        for section, readers in METHOD_SECTIONS.items():
            if method in readers:
                continue
            settings = getattr(self, section)
            for name, default in vars(type(settings)()).items():
                if getattr(settings, name) != default:
                    raise ConfigError(f"{section}.{name} applies to --method {' or '.join(readers)} only, not "
                                      f"{method}; drop it or choose one of those methods")


# Which methods read which section of PretrainConfig (each a dataclass with `validate` and `resolved`), and which
# a setting in a section the chosen method does not read is refused. The methods without a section read
# train.temperature.
METHOD_SECTIONS = {"moco": MOCO_METHODS, "swav": SWAV_METHODS, "pirl": PIRL_METHODS}


# --- evaluation and inference --------------------------------------------------------------------------------------

PROTOCOLS = ("cached", "paper")  # linear evaluation
OPTIMIZERS = ("sgd", "lars")  # fine-tuning
BASE_LR = {"sgd": 0.05, "lars": 0.005}  # fine-tuning: v1 Appendix B.6 (x B/256); v2 (x sqrt(B))
FINETUNE_BATCH = 256  # fine-tuning's training batch unless the labelled subset is small
# A fine-tuning epoch has at least this many steps: a batch of the whole labelled subset made an epoch one step, and
# the demo's 10% of the digits (143 images) got 30 steps in all.
MIN_STEPS_PER_EPOCH = 4
LR_SCALING = {"sgd": "linear", "lars": "sqrt"}
EXPORT_TARGETS = ("torchvision", "safetensors-encoder", "onnx")


@dataclass
class InferenceConfig:
    """Where and how fast an encoder runs over images: what every command that reads images with it shares."""

    batch_size: int = 256  # images per forward pass (a training batch where a command trains)
    workers: int | None = None  # DataLoader worker processes; None = chosen from the machine
    device: str = "auto"
    precision: str = "auto"

    def validate_inputs(self, section: str, *, batch_size_optional: bool = False) -> None:
        """The shared fields, errors named `<section>.<field>` (`batch_size` may be None when the task chooses it)."""
        if (self.batch_size is not None or not batch_size_optional) and (not is_whole_number(self.batch_size) or self.batch_size < 1):
            raise ConfigError(f"{section}.batch_size {self.batch_size!r} must be a whole number >= 1")
        if self.workers is not None and (not is_whole_number(self.workers) or self.workers < 0):
            raise ConfigError(f"{section}.workers {self.workers!r} must be a whole number >= 0; use 0 to load in the main process")


@dataclass
class LabelledEvalConfig(InferenceConfig):
    """What an evaluation on labelled data adds: the data (by default the encoder's own pretraining data, when named)
    and whether to evaluate the untrained twin of the encoder."""

    data: str | None = None  # a dataset name or a folder with train/ and val/ (or test/); None = the pretraining data
    train: str | None = None  # a class-per-subfolder training folder (with val)
    val: str | None = None  # a class-per-subfolder evaluation folder (with train)
    data_root: str | None = None  # where named datasets are stored
    download: bool = False
    random_init: bool = False  # the same architecture with fresh weights: the baseline pretraining is measured against
    seed: int = 0  # the random init, the data order and the augmentations


@dataclass
class KnnConfig(LabelledEvalConfig):
    """`simclr knn`: weighted kNN accuracy (Wu et al. 2018)."""

    k: tuple[int, ...] | None = None  # several share one search; the first is the headline. None: 200, or 20 below 10,000 images
    temperature: float = DEFAULT_TEMPERATURE
    layer: str = "encoder"  # which representation votes (features.LAYERS)
    chunk_size: int = 1024  # queries per similarity block
    bank_chunk_size: int = 65536  # training features per similarity block

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field, its value and the fix."""
        self.validate_inputs("knn")
        ks = tuple(self.k) if isinstance(self.k, (tuple, list)) else ()
        if self.k is not None and (not ks or not all(is_whole_number(k) and k >= 1 for k in ks)):
            raise ConfigError(f"knn.k {self.k!r} is not valid; give one or more whole numbers >= 1 (e.g. 200, or 20 for small sets)")
        if len(set(ks)) != len(ks):
            raise ConfigError(f"knn.k {self.k!r} repeats a value; list each k once")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ConfigError(f"knn.temperature {self.temperature!r} must be a number > 0; the protocol uses 0.1")
        if self.layer not in LAYERS:
            raise ConfigError(f"knn.layer {self.layer!r} is not one of {', '.join(LAYERS)}; encoder (h) is the usual choice")
        for name in ("chunk_size", "bank_chunk_size"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise ConfigError(f"knn.{name} {value!r} must be a whole number >= 1")


@dataclass
class LinearEvalConfig(LabelledEvalConfig):
    """`simclr linear-eval`: a linear classifier on the frozen encoder (batch_size: the paper protocol's training
    batch B; the cached protocol's feature-extraction batch)."""

    protocol: str = "cached"  # cached (L-BFGS on extracted features) | paper (SimCLR Appendix B.5)
    layer: str = "encoder"  # which representation: encoder (h), head1, head2, projection (z)
    # paper protocol
    epochs: int | None = None  # None: 90 above 64 px (ImageNet), 100 at <= 64 px (CIFAR) (Appendix B.5)
    lr: float = 0.1  # BASE lr, x B/256 (Appendix B.5)
    momentum: float = 0.9  # Nesterov
    log_every: int = 10
    # cached protocol
    l2: float = 1e-4  # L2 penalty on the weights, 0.5 * l2 * |W|^2 added to the mean cross-entropy
    max_iter: int = 1000  # L-BFGS iterations (it stops earlier when converged)

    def validate(self) -> None:
        self.validate_inputs("linear_eval")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"linear_eval.protocol '{self.protocol}' is not supported; choose one of {', '.join(PROTOCOLS)}")
        if self.layer not in LAYERS:
            raise ConfigError(f"linear_eval.layer '{self.layer}' is not supported; choose one of {', '.join(LAYERS)}")
        for name in ("log_every", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"linear_eval.{name} {value!r} must be a whole number >= 1")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ConfigError(f"linear_eval.epochs {self.epochs!r} must be a whole number >= 1, or unset for the paper's 90/100")
        if not (is_finite_number(self.lr) and self.lr > 0):
            raise ConfigError(f"linear_eval.lr {self.lr!r} must be a positive number; the paper uses 0.1 (x B/256)")
        if not (is_finite_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"linear_eval.momentum {self.momentum!r} must be in [0, 1); the paper uses 0.9")
        if not (is_finite_number(self.l2) and self.l2 >= 0):
            raise ConfigError(f"linear_eval.l2 {self.l2!r} must be >= 0; use e.g. 1e-4, or 0 for none")

    def resolved(self, *, image_size: int) -> LinearEvalConfig:
        """Copy with the paper protocol's epochs filled in from the encoder's image size."""
        self.validate()
        if self.protocol == "paper" and self.epochs is None:
            return replace(self, epochs=100 if image_size <= SMALL_IMAGE_MAX_SIZE else 90)
        return replace(self)


@dataclass
class FinetuneConfig(LabelledEvalConfig):
    """`simclr finetune`: the whole encoder and a linear classifier on (a fraction of) the labels."""

    batch_size: int | None = None  # None: FINETUNE_BATCH, at most 1/MIN_STEPS_PER_EPOCH of the labelled subset
    label_fraction: float = 1.0  # class-balanced fraction of the train labels used (0.01 and 0.1 in the papers)
    label_file: str | None = None  # instead: the train images to use, one path a line, relative to the train folder
    init: str | None = None  # start from these weights (the checkpoint still gives architecture and transform)
    from_head_layer: int = 0  # 0: from h (v1); 1: through the head's first block (SimCLRv2 §2)
    epochs: int | None = None  # None: 60 at <= 1% labels, 30 otherwise (v1 Appendix B.6), more to reach min_steps
    # With epochs unset, at least this many optimisation steps: the papers' epochs are 190 or more steps of a batch of
    # 4096 on ImageNet's 1% and 10%, where a small labelled set's epochs are a few steps each.
    min_steps: int = 300
    optimizer: str = "sgd"  # sgd (v1: Nesterov) | lars (v2)
    lr: float | None = None  # BASE lr; None: 0.05 x B/256 (sgd) or 0.005 x sqrt(B) (lars)
    momentum: float = 0.9
    weight_decay: float = 0.0  # the papers fine-tune without weight decay
    log_every: int = 10

    def validate(self) -> None:
        self.validate_inputs("finetune", batch_size_optional=True)
        if not (is_finite_number(self.label_fraction) and 0 < self.label_fraction <= 1):
            raise ConfigError(
                f"finetune.label_fraction {self.label_fraction!r} must be in (0, 1]; e.g. 0.01 for 1% of the labels"
            )
        for name in ("log_every", "min_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"finetune.{name} {value!r} must be a whole number >= 1")
        if self.epochs is not None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ConfigError(f"finetune.epochs {self.epochs!r} must be a whole number >= 1, or unset for 60 (1% labels) / 30")
        if isinstance(self.from_head_layer, bool) or not isinstance(self.from_head_layer, int) or self.from_head_layer < 0:
            raise ConfigError(f"finetune.from_head_layer {self.from_head_layer!r} must be 0 (from h) or 1 (SimCLRv2)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"finetune.optimizer '{self.optimizer}' is not supported; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (is_finite_number(self.lr) and self.lr > 0):
            raise ConfigError(f"finetune.lr {self.lr!r} must be a positive number, or unset for 0.05 (sgd) / 0.005 (lars)")
        if not (is_finite_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"finetune.momentum {self.momentum!r} must be in [0, 1); the papers use 0.9")
        if not (is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"finetune.weight_decay {self.weight_decay!r} must be >= 0; the papers use 0")

    def resolved(self, *, labelled_images: int, labelled_fraction: float) -> FinetuneConfig:
        """Copy with the batch (for the labelled subset's size), the epochs (from the fraction of labels actually used,
        raised to min_steps) and the base lr filled in."""
        self.validate()
        batch = self.batch_size
        if batch is None:
            batch = max(2, min(FINETUNE_BATCH, labelled_images // MIN_STEPS_PER_EPOCH))
        batch = min(batch, labelled_images)
        epochs = self.epochs
        if epochs is None:
            epochs = 60 if labelled_fraction <= 0.01 else 30
            epochs = max(epochs, math.ceil(self.min_steps / max(1, labelled_images // batch)))
        return replace(self, batch_size=batch, epochs=epochs, lr=BASE_LR[self.optimizer] if self.lr is None else self.lr)


DISTILL_BASE_LR = {"lars": 0.1, "sgd": 0.1}  # v2 §3: distillation uses pretraining's 0.1 x sqrt(B) (LARS); sgd: x B/256


@dataclass
class DistillConfig(InferenceConfig):
    """`simclr distill`: a student trained on unlabelled images to match a fine-tuned teacher's class distribution
    (SimCLRv2 §2.3); batch_size is the training batch."""

    data: str | None = None  # the unlabelled images: a folder or a dataset name; None = the teacher's pretraining data
    val: str | None = None  # labelled data (a name or a folder with train/ and val/) evaluated each epoch; None = as data
    data_root: str | None = None
    download: bool = False
    student_arch: str | None = None  # None: the teacher's (self-distillation)
    student_width: float | None = None
    student_sk_ratio: float | None = None
    init: str | None = None  # the student encoder's starting weights (any --init layout); None = random
    temperature: float = 1.0  # tau of both softmaxes (v2 §2.3; 1.0 for big-to-small, 0.1 for self-distillation)
    labels_weight: float = 0.0  # a of eq. 3 as (1 - a) distillation + a cross-entropy on the labelled images (alpha = 1 - a)
    label_fraction: float | None = None  # the labelled images: a class-balanced fraction of val's train split; None = the teacher's
    label_file: str | None = None  # instead: the images this file lists (relative to the train folder)
    epochs: int = 400  # v2 §3
    optimizer: str = "lars"  # lars (v2: as pretraining) | sgd (Nesterov)
    lr: float | None = None  # BASE lr; None: 0.1 x sqrt(B) (lars) or 0.1 x B/256 (sgd)
    momentum: float = 0.9
    weight_decay: float = 1e-4  # v2 §3: pretraining's
    warmup_epochs: float | None = None  # None: the first 5% of the epochs (v2 §3)
    seed: int = 0
    log_every: int = 10
    on_bad_image: str = "skip"
    max_bad_fraction: float = badfiles.DEFAULT_MAX_BAD_FRACTION
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> None:
        self.validate_inputs("distill")
        ModelConfig(arch=self.student_arch or "resnet50", width=1.0 if self.student_width is None else self.student_width,
                    sk_ratio=self.student_sk_ratio or 0.0).validate()
        if not (is_finite_number(self.temperature) and self.temperature > 0):
            raise ConfigError(f"distill.temperature {self.temperature!r} must be a number > 0; the paper uses 1 (or 0.1)")
        if not (is_finite_number(self.labels_weight) and 0 <= self.labels_weight < 1):
            raise ConfigError(f"distill.labels_weight {self.labels_weight!r} must be in [0, 1): the weight of the labels' "
                              "cross-entropy, the distillation loss getting 1 - a")
        if self.label_fraction is not None and not (is_finite_number(self.label_fraction) and 0 < self.label_fraction <= 1):
            raise ConfigError(f"distill.label_fraction {self.label_fraction!r} must be in (0, 1]; e.g. 0.1 for 10% of the labels")
        if self.label_fraction is not None and self.label_file is not None:
            raise ConfigError("pass --label-fraction or --label-file, not both")
        if (self.label_fraction is not None or self.label_file is not None) and not self.labels_weight:
            raise ConfigError("--label-fraction/--label-file choose the labelled images of --labels-weight; "
                              "pass --labels-weight a (e.g. 0.5) too, or drop them")
        for name in ("epochs", "log_every"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 1:
                raise ConfigError(f"distill.{name} {value!r} must be a whole number >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"distill.optimizer {self.optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr is not None and not (is_finite_number(self.lr) and self.lr > 0):
            raise ConfigError(f"distill.lr {self.lr!r} must be a positive number, or unset for 0.1 (x sqrt(B) with lars)")
        if not (is_finite_number(self.momentum) and 0 <= self.momentum < 1):
            raise ConfigError(f"distill.momentum {self.momentum!r} must be in [0, 1); the paper uses 0.9")
        if not (is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"distill.weight_decay {self.weight_decay!r} must be >= 0; the paper uses 1e-4")
        if self.warmup_epochs is not None and not (is_finite_number(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ConfigError(f"distill.warmup_epochs {self.warmup_epochs!r} must be >= 0, or unset for 5% of the epochs")
        badfiles.BadFiles.check_settings(max_bad_fraction=self.max_bad_fraction, max_image_pixels=self.max_image_pixels)
        if self.on_bad_image not in badfiles.POLICIES:
            raise ConfigError(f"distill.on_bad_image {self.on_bad_image!r} is not supported; choose one of {', '.join(badfiles.POLICIES)}")

    def resolved(self) -> DistillConfig:
        """Copy with the base lr and the warm-up filled in."""
        self.validate()
        return replace(
            self, lr=DISTILL_BASE_LR[self.optimizer] if self.lr is None else self.lr,
            warmup_epochs=0.05 * self.epochs if self.warmup_epochs is None else self.warmup_epochs,
        )


@dataclass
class CkaConfig(LabelledEvalConfig):
    """`simclr cka`: linear CKA between the stage outputs of encoders A and B on the held-out images of `data`.
    random_init: B is the untrained twin of B's file; random_init_a: A is A's (drawn from seed + 1, so two twins differ)."""

    random_init_a: bool = False
    max_images: int = 10000  # a seed-drawn subset above this (Kornblith et al. 2019 use the 10,000 CIFAR-10 test images)
    chunk_rows: int = 4096  # feature rows per float64 block of the cross-products

    def validate(self) -> None:
        self.validate_inputs("cka")
        for name in ("max_images", "chunk_rows"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 2:
                raise ConfigError(f"cka.{name} {value!r} must be a whole number >= 2")


COMPARE_TASKS = ("knn", "linear", "finetune-1pct", "rotation", "jigsaw", "colour-grid")  # the first three read labels
DEFAULT_COMPARE_TASKS = ("knn", "linear", "rotation", "jigsaw", "colour-grid")  # finetune-1pct trains: asked for by name


@dataclass
class CompareConfig(InferenceConfig):
    """`simclr compare`: every encoder on every task and dataset, one table. random_init adds the untrained twin of
    the first encoder as a row; the probes fit on at most probe_train_images of a dataset's train split (or 80% of
    an unlabelled folder) and score on at most probe_test_images held-out images, both drawn with seed."""

    data: tuple[str, ...] = ()  # dataset names or folders (train/ + val/ for knn and linear; any image folder for probes)
    data_root: str | None = None
    download: bool = False
    tasks: tuple[str, ...] = DEFAULT_COMPARE_TASKS
    random_init: bool = False
    seed: int = 0
    probe_train_images: int = 2000
    probe_test_images: int = 1000
    knn_temperature: float = DEFAULT_TEMPERATURE  # kNN: k from neighbours.default_k (20 below 10,000 train images)
    l2: float = 1e-4  # linear and the classification probes: logistic.fit_linear's L2, as linear-eval's cached protocol
    max_iter: int = 1000

    def validate(self) -> None:
        self.validate_inputs("compare")
        if not self.data:
            raise ConfigError("compare needs --data: a dataset name or a folder (give --data several times to compare on several)")
        tasks = tuple(self.tasks) if isinstance(self.tasks, (tuple, list)) else ()
        unknown = [t for t in tasks if t not in COMPARE_TASKS]
        if not tasks or unknown:
            raise ConfigError(f"--tasks {','.join(map(str, unknown or tasks)) or '(none)'} is not valid; choose from "
                              f"{','.join(COMPARE_TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"--tasks {','.join(tasks)} repeats a task; list each once")
        for name in ("probe_train_images", "probe_test_images"):
            value = getattr(self, name)
            if not is_whole_number(value) or value < 2:
                raise ConfigError(f"compare.{name} {value!r} must be a whole number >= 2")
        if not (is_finite_number(self.knn_temperature) and self.knn_temperature > 0):
            raise ConfigError(f"compare.knn_temperature {self.knn_temperature!r} must be > 0; the protocol uses 0.1")
        if not (is_finite_number(self.l2) and self.l2 >= 0):
            raise ConfigError(f"compare.l2 {self.l2!r} must be >= 0; use e.g. 1e-4")
        if not is_whole_number(self.max_iter) or self.max_iter < 1:
            raise ConfigError(f"compare.max_iter {self.max_iter!r} must be a whole number >= 1")


@dataclass
class EmbedConfig(InferenceConfig):
    """`simclr embed`: one row per image of a folder."""

    layer: str = "encoder"
    normalize: bool = False  # L2-normalise each row
    on_bad_image: str = "skip"
    max_bad_fraction: float = badfiles.DEFAULT_MAX_BAD_FRACTION
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    plot: bool = False  # also draw a 2-D map with thumbnails (VECS.png)
    plot_method: str = "pca"  # pca | tsne | umap
    # rows between progress records of the unfinished .npy (partial.py): what a kill -9 can cost, and one fdatasync each
    chunk_rows: int = 4096

    def validate(self) -> None:
        self.validate_inputs("embed")
        if not is_whole_number(self.chunk_rows) or self.chunk_rows < 1:
            raise ConfigError(f"embed.chunk_rows {self.chunk_rows!r} must be a whole number >= 1")
        if self.layer not in LAYERS:
            raise ConfigError(f"embed.layer {self.layer!r} is not one of {', '.join(LAYERS)}; encoder (h) is the usual choice")
        badfiles.BadFiles.check_settings(max_bad_fraction=self.max_bad_fraction, max_image_pixels=self.max_image_pixels)
        if self.on_bad_image not in badfiles.POLICIES:
            raise ConfigError(f"embed.on_bad_image {self.on_bad_image!r} is not supported; choose one of {', '.join(badfiles.POLICIES)}")


@dataclass
class RetrievalConfig(InferenceConfig):
    """`simclr knn --index --query`: each query image's nearest indexed images."""

    k: int = 5
    layer: str | None = None  # None: the index's own layer

    def validate(self) -> None:
        self.validate_inputs("retrieval")
        if not is_whole_number(self.k) or self.k < 1:
            raise ConfigError(f"retrieval.k {self.k!r} must be a whole number >= 1")
        if self.layer is not None and self.layer not in LAYERS:
            raise ConfigError(f"retrieval.layer {self.layer!r} is not one of {', '.join(LAYERS)}")


@dataclass
class ExportConfig:
    """`simclr export`: an encoder's weights in another format."""

    to: str = "torchvision"
    include_fc: bool = False  # torchvision: also write a fine-tuned classifier as fc

    def validate(self) -> None:
        if self.to not in EXPORT_TARGETS:
            raise ConfigError(f"--to {self.to!r} is not a known export target; choose one of {', '.join(EXPORT_TARGETS)}")


# Each command's section in a preset and its --set keys (`--set knn.k=[10,20]`).
TASK_CONFIGS = {"knn": KnnConfig, "linear_eval": LinearEvalConfig, "finetune": FinetuneConfig, "embed": EmbedConfig,
                "retrieval": RetrievalConfig, "distill": DistillConfig, "cka": CkaConfig,
                "compare": CompareConfig}
