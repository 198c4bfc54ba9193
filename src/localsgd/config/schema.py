"""The typed recipe schema.

The sections every recipe has whatever parts it chooses. The ``sync`` and ``engine``
sections are composed from their registered parts (``localsgd.sync.parts``,
``localsgd.engines.registry``) and the whole recipe is assembled in ``localsgd.recipe``;
each component later receives only its own section. Defaults live in the dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from localsgd.config.domains import (
    AT_LEAST_ONE,
    FRACTION,
    NAME,
    NON_NEGATIVE,
    PATH,
    POSITIVE,
    Choice,
    Items,
    Length,
    Range,
    Text,
    domain,
)


class ModelName(str, Enum):
    resnet20 = "resnet20"
    resnet32 = "resnet32"
    resnet44 = "resnet44"
    resnet56 = "resnet56"
    resnet110 = "resnet110"
    vgg16 = "vgg16"
    wrn28_10 = "wrn28_10"
    densenet40_12 = "densenet40_12"
    # A tiny convnet without BatchNorm: for smoke tests and exactness checks where
    # per-worker batch statistics would otherwise differ from a single large batch.
    simplecnn = "simplecnn"
    # Decoder-only transformers (localsgd.models.gpt) for task.name=lm; sizes in GPT_SIZES.
    gpt_tiny = "gpt_tiny"
    gpt_mini = "gpt_mini"
    gpt2_124m = "gpt2_124m"


class Positions(str, Enum):
    rope = "rope"
    learned = "learned"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class DataPipeline(str, Enum):
    torchvision = "torchvision"
    device = "device"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DatasetName(str, Enum):
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    imagefolder = "imagefolder"
    synthetic = "synthetic"
    text = "text"


class Backend(str, Enum):
    auto = "auto"
    gloo = "gloo"
    nccl = "nccl"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LRDecay(str, Enum):
    multistep = "multistep"
    cosine = "cosine"
    constant = "constant"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


MIN_IMAGE_SIZE = 8
"""Smallest ``data.image_size``: every model halves the image at least twice."""
MIN_SYNTHETIC_SAMPLES = 4
"""Smallest ``data.synthetic_samples``: the synthetic test set is a quarter of it."""
MIN_SYNTHETIC_CLASSES = 2
MAX_TIMEOUT_S = 1e7
"""Largest ``dist.timeout_s`` (about 115 days): the process group holds it in milliseconds
and Python's timedelta has its own limit."""
WANDB_PROJECT = Text(what="a W&B project name", max_len=128, forbid="/\\#?%:")
"""W&B refuses longer project names and these characters."""
WANDB_NAME = Text(what="a non-empty string", max_len=128)
WANDB_TAG = Text(what="a tag", max_len=64)
"""W&B tags are 1 to 64 characters."""


@dataclass
class ModelConfig:
    name: ModelName = ModelName.resnet20
    """Architecture; CIFAR ResNets have depth 6n+2."""
    dtype: DType = DType.float32
    """Parameter dtype; float64 makes equivalence checks immune to float32 rounding."""
    precision: Precision = Precision.fp32
    """Compute precision of forward and backward: fp32, or bf16/fp16 mixed precision
    (autocast on DDP with a per-worker gradient scaler for fp16; DeepSpeed's bf16 section).
    Parameters, averages, BatchNorm statistics and evaluation stay fp32."""
    channels_last: bool = False
    """Hold 4-D weights and input batches in channels_last (NHWC) memory: convolutions in
    bf16/fp16 run on GPU tensor cores without layout conversions. Results differ from the
    default layout by float rounding only (the sync code averages in any dense layout).
    The ddp engine only: DeepSpeed's set-up needs the default layout."""
    positions: Positions = Positions.rope
    """GPT models: rotary position embeddings (rope) or a learned position table (learned)."""
    dropout: float = domain(FRACTION, 0.0)
    """GPT models: dropout probability on attention and residual outputs, in [0, 1)."""
    tie_embeddings: bool = True
    """GPT models: the output projection shares the token embedding's weights."""


@dataclass
class DataConfig:
    name: DatasetName = DatasetName.cifar10
    """Dataset: torchvision CIFAR-10/100, an ImageFolder tree (train/ and val/), or synthetic."""
    root: str = domain(PATH, "data")
    """Directory holding the dataset (for CIFAR: the folder containing cifar-10-batches-py)."""
    download: bool = True
    """Try torchvision's download when the dataset is not under ``root``."""
    batch_size: int = domain(AT_LEAST_ONE, 128)
    """Per-worker mini-batch size B_loc; the global batch is world_size * B_loc."""
    pipeline: DataPipeline = DataPipeline.torchvision
    """torchvision (default: per-sample PIL transforms in data.num_workers loader processes)
    or device (CIFAR only: the training set sits on the training device as uint8 and whole
    batches are cropped, flipped and normalised with tensor ops; the same crops and flips
    as torchvision's, sample for sample, and the same partition)."""
    augment: bool = True
    """CIFAR augmentation: pad-4 random crop and horizontal flip (normalisation is always on)."""
    num_workers: int = domain(NON_NEGATIVE, 2)
    """DataLoader worker processes per rank."""
    train_subset: int | None = domain(AT_LEAST_ONE, None)
    """Use only the first N training samples (smoke tests, quick demos)."""
    test_subset: int | None = domain(AT_LEAST_ONE, None)
    """Use only the first N test samples (data.name=text: N validation windows spread evenly
    over the held-out documents)."""
    image_size: int = domain(Range(lo=MIN_IMAGE_SIZE), 32)
    """Side length of images (synthetic data; ImageFolder images are resized to it)."""
    synthetic_samples: int = domain(Range(lo=MIN_SYNTHETIC_SAMPLES), 512)
    """Number of training samples for the synthetic dataset (test set: a quarter of it)."""
    synthetic_classes: int = domain(Range(lo=MIN_SYNTHETIC_CLASSES), 10)
    """Number of classes of the synthetic dataset."""
    context: int = domain(Range(lo=2), 128)
    """data.name=text: tokens per training window (the model's context length); a sample is
    one window, so the per-worker batch holds data.batch_size x data.context tokens."""
    val_fraction: float = domain(Range(0, 1, lo_open=True, hi_open=True), 0.1)
    """data.name=text: share of the bytes held out for validation, as whole documents
    (at least one document), drawn with the recipe's seed."""
    cache_dir: str | None = domain(PATH, None)
    """data.name=text: folder for the token cache (never inside data.root). None: the
    environment variable LOCALSGD_CACHE if set, else ~/.cache/localsgd/text."""


class OptimName(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    """Inner optimizer of every worker: sgd (momentum, Nesterov: the paper's) or adamw."""
    base_lr: float = domain(POSITIVE, 0.1)
    """Learning rate per ``base_batch_size`` samples; scaled linearly with the global batch."""
    base_batch_size: int = domain(AT_LEAST_ONE, 64)
    """Reference batch size for ``base_lr`` (the paper: 0.1 per 64 samples)."""
    momentum: float = domain(FRACTION, 0.9)
    """SGD momentum (optim.name=sgd)."""
    nesterov: bool = True
    """Use Nesterov momentum (optim.name=sgd)."""
    betas: list[float] = domain(Length(2, FRACTION), factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2) (optim.name=adamw)."""
    eps: float = domain(POSITIVE, 1e-8)
    """AdamW's epsilon (optim.name=adamw)."""
    weight_decay: float = domain(NON_NEGATIVE, 1e-4)
    """Weight decay: L2 added to the gradient for sgd, decoupled for adamw."""
    no_decay_bn_bias: bool = True
    """Exempt every 1-D parameter from weight decay: BatchNorm and LayerNorm weights and
    biases (the paper's setting). Embedding tables are exempted too (see no_decay_embeddings)."""
    no_decay_embeddings: bool = True
    """Exempt nn.Embedding weights from weight decay (a tied output projection with them)."""
    grad_clip: float = domain(NON_NEGATIVE, 0.0)
    """Clip every inner step's gradient to this global L2 norm (0: off). ddp clips the
    worker's (all-reduced, unscaled) gradient with torch.nn.utils.clip_grad_norm_; deepspeed
    passes it as gradient_clipping. On local steps each worker clips its own gradient."""


@dataclass
class LRScheduleConfig:
    warmup_epochs: float = domain(NON_NEGATIVE, 0.0)
    """Linear warmup from base_lr (unscaled) to the scaled LR over this many epochs."""
    decay: LRDecay = LRDecay.multistep
    """Decay after warmup: multistep (x gamma at each milestone), cosine to 0, or constant."""
    milestones: list[int] = domain(Items(AT_LEAST_ONE, increasing=True), factory=list)
    """Epochs at which multistep decay multiplies the LR by ``gamma``."""
    gamma: float = domain(Range(0, 1, lo_open=True), 0.1)
    """Multistep decay factor."""
    warmup_steps: int = domain(NON_NEGATIVE, 0)
    """Linear warmup over this many optimizer steps; when > 0 it replaces warmup_epochs."""
    warmup_start: float | None = domain(Range(0, 1, lo_open=True), None)
    """Fraction of the peak LR where warmup starts, in (0, 1]; None: base_lr / peak LR (the
    gradual warmup from the unscaled LR; 1.0 when the LR is not scaled). LM recipes use e.g.
    0.01."""
    min_lr_ratio: float = domain(Range(0, 1), 0.0)
    """decay=cosine: the LR decays to this fraction of the peak instead of 0, in [0, 1]."""
    total_steps: int | None = domain(AT_LEAST_ONE, None)
    """Optimizer steps the schedule spans (warmup plus decay); None: train.epochs x the
    steps per epoch. Step-budgeted recipes set it to ${train.max_steps}."""



def _task_names() -> list[str]:
    from localsgd.tasks import TASKS  # the tasks import this schema

    return TASKS.names()


@dataclass
class TaskConfig:
    name: str = domain(Choice(_task_names, key="task.name"), "classify")
    """What is learnt: classify (images to classes; accuracy) or lm (next-byte language
    modelling of text; loss, perplexity and bits per byte). Tasks are the files of
    localsgd.tasks; each supplies the datasets, the model family, the loss and the metrics."""


@dataclass
class TrainConfig:
    epochs: int = domain(AT_LEAST_ONE, 1)
    """Number of epochs (full passes over each worker's partition)."""
    grad_accum: int = domain(AT_LEAST_ONE, 1)
    """Micro-batches per optimizer step; the sync counter counts optimizer steps."""
    max_steps: int | None = domain(AT_LEAST_ONE, None)
    """Stop after this many optimizer steps (tests and benchmarks); None = run all epochs."""
    log_every_steps: int = domain(AT_LEAST_ONE, 10)
    """Write a train/* record to metrics.jsonl every N optimizer steps."""
    eval_every_epochs: int = domain(AT_LEAST_ONE, 1)
    """Evaluate on the test set every N epochs (and always after the last one)."""
    target_acc: float | None = domain(Range(0, 1, lo_open=True), None)
    """Eval accuracy (0-1) whose first crossing is reported as time-to-accuracy."""
    target_loss: float | None = domain(POSITIVE, None)
    """Eval loss (nats per sample or token) whose first crossing from above is reported as
    time/to_target_s (with target_acc too, the first evaluation meeting both)."""
    eval_every_steps: int = domain(NON_NEGATIVE, 0)
    """Also evaluate every N optimizer steps inside epochs (0: only at epoch ends); the
    results are "eval" records. LM epochs are long, so LM recipes evaluate by steps."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""
    track_time: bool = False
    """Time each phase of the steps (data, forward, backward, comm+optimizer; CUDA events on
    a GPU) and log the sums per epoch as time/*. Off, the step records nothing: the timer
    costs host time and, on a GPU, eight events per step, which shows for small models."""
    compile: bool = False
    """torch.compile the training forward and backward: less Python overhead per step, which
    matters for small models and batches; the first steps pay for compilation. ddp compiles
    its DDP wrapper (gradient all-reduces still overlap with backward), deepspeed calls
    DeepSpeedEngine.compile. Parameters, the state_dict, averaging and evaluation stay the
    plain module's."""
    compile_backend: str = domain(NAME, "inductor")
    """torch.compile backend for train.compile: inductor (needs a C++ compiler on CPU, and
    Triton on CUDA), or aot_eager / eager, which skip code generation."""


@dataclass
class DistConfig:
    backend: Backend = Backend.auto
    """Process-group backend; auto picks nccl on CUDA and gloo on CPU."""
    device: Device = Device.auto
    """auto uses CUDA when available."""
    timeout_s: float = domain(Range(0, MAX_TIMEOUT_S, lo_open=True), 600.0)
    """Collective timeout: a stopped or lost peer fails the job after this many seconds."""


@dataclass
class RunConfig:
    dir: str = domain(PATH, "runs/${name}")
    """Run directory: config.yaml, metrics.jsonl, summary.json, model.pt, checkpoints/."""
    resume: bool = True
    """Resume from the latest complete checkpoint in ``dir/checkpoints`` when one exists."""
    checkpoint_every_epochs: int = domain(NON_NEGATIVE, 1)
    """Write a checkpoint every N epochs (0: none at epoch ends)."""
    checkpoint_every_steps: int = domain(NON_NEGATIVE, 0)
    """Also write one every N optimizer steps, mid-epoch included (0: off). A restarted job
    loses at most this many steps of work."""
    keep_checkpoints: int = domain(AT_LEAST_ONE, 2)
    """Number of most recent checkpoints kept."""


@dataclass
class WandbConfig:
    mode: WandbMode | None = None
    """offline, online or disabled; None means WANDB_MODE if set, else offline."""
    project: str = domain(WANDB_PROJECT, "localsgd")
    """W&B project."""
    entity: str | None = domain(NAME, None)
    """W&B entity (team or user); None uses the default."""
    group: str | None = domain(WANDB_NAME, None)
    """Runs of one experiment share a group; None uses the recipe name."""
    name: str | None = domain(WANDB_NAME, None)
    """Run name; None uses the run directory's name."""
    tags: list[str] = domain(Items(WANDB_TAG), factory=list)
    """Run tags."""
    notes: str | None = domain(Text(what="a string", empty=True), None)
    """Run notes."""
