"""Configuration: one frozen, keyword-only dataclass per section, loaded from plain YAML.

YAML is read with ``yaml.safe_load`` (no code-executing tags). Every value is checked on load:
an unknown key names the nearest valid one, a wrong type or a bad value names the field.
Command-line overrides look like ``--coop.alpha=0.5`` (the value is parsed as YAML).

A setting is declared once, with its meaning: ``name: type = opt(default, "meaning", choices=(...))``, plus
``research=True`` for a switch that exists for the ablations of docs/results/8k/RESULTS.md. ``dist-coop config`` and
docs/guide/config.md list it from there (regenerate the page: ``dist-coop config --markdown >
docs/guide/config.md``), and its choices are what validation accepts. A list of choices that a module of the
package also checks is held in ``dist_coop.choices``. A range, or a rule between settings, goes in the section's
``__post_init__``. A setting that is gone is listed in ``REMOVED``: a stored config holding it at its old default
still loads, any other value is refused naming what to use instead.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# This module imports only the plain data of dist_coop.choices (every other module may import it).
from dist_coop.choices import (
    BN_MODES,
    CHECKPOINT_MODES,
    DATASETS,
    GATE_MODES,
    HEAD_MODES,
    KEEP_MODES,
    MODEL_NAMES,
    ON_CORRUPT,
    ON_NONFINITE,
    PLACEMENTS,
    TASKS,
)

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # check_device reads the pattern


def opt(
    default: Any,
    meaning: str,
    *,
    choices: tuple[Any, ...] = (),
    research: bool = False,
    check: Callable[[Any, str], None] | None = None,
) -> Any:
    """A setting: its default and its meaning in one line (what ``dist-coop config`` and docs/guide/config.md show).

    ``choices``: the values it takes, checked on load; ``check(value, "section.key")``: a function that checks it
    instead (the choices are then only shown); ``research``: it exists for the ablations of docs/results/8k/RESULTS.md (its
    default is the recipe) and the reference lists it apart, after every recipe setting.
    """
    metadata = {"meaning": meaning, "choices": tuple(choices), "research": research, "check": check}
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _choice(section: str, name: str, value: object, choices: typing.Iterable[object]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {choices}, got {value!r}")


def _check_fields(section: str, obj: object) -> None:
    """What each field's metadata says: every float (and every float in a list) is finite, as inf and nan slip
    past range checks; then each value is among its choices, or passes its ``check``."""
    fields = dataclasses.fields(obj)
    for f in fields:
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{section}.{f.name} must be finite, got {v}")
    for f in fields:
        if f.metadata.get("check"):
            f.metadata["check"](getattr(obj, f.name), f"{section}.{f.name}")
        elif f.metadata.get("choices"):
            _choice(section, f.name, getattr(obj, f.name), f.metadata["choices"])


def check_device(value: str, name: str = "train.device") -> None:
    """A device name this project runs on (whether that device is present is checked at start)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"{name} must be one of {', '.join(DEVICES)} (N: a GPU index), got {value!r}")


def check_model_name(name: str, field: str = "model.name") -> None:
    """A backbone of ``dist_coop.models.registry`` (``choices.MODEL_NAMES``)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"{field}: unknown model {name!r}; available: {sorted(MODEL_NAMES)}")


def _positive(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The backbone each net is built from, and how its depth adapts."""

    name: str = opt(
        "resnet32",
        "the backbone of every net (the Leader's may be wider: model.leader_width)",
        choices=MODEL_NAMES,
        check=check_model_name,
    )
    width: int = opt(0, "base channels; 0 = the backbone's default")
    in_channels: int = opt(3, "image channels the nets take (Fashion-MNIST: 1); must match the data")
    num_classes: int = opt(10, "classes the nets predict; must match the data")
    keep: str = opt(
        "prefix",
        "the blocks a depth keeps in each stage: the first ones (prefix) or evenly spread ones (spread)",
        choices=KEEP_MODES,
        research=True,
    )
    gate: str = opt(
        "learned", "learned = a learned scalar gate on each skippable block | none", choices=GATE_MODES, research=True
    )
    bn: str = opt(
        "shared",
        "shared = BN statistics per depth, affine weights shared | private = both per depth (switchable BN)",
        choices=BN_MODES,
        research=True,
    )
    zero_init: bool = opt(
        False, "skippable blocks start as the identity (the last BN of their branch zeroed)", research=True
    )
    head_norm: bool = opt(True, "BN (statistics per depth) on the pooled features before the classifier", research=True)
    head: str = opt(
        "shared",
        "shared = one classifier for every depth | private = one per trained depth (a net trained at one depth "
        "keeps one)",
        choices=HEAD_MODES,
        research=True,
    )
    # compute what several depths compute alike once per step: exact, see AdaptiveNet.branch_starts
    share_prefix: bool = opt(
        True,
        "compute what several depths compute alike (stem, common blocks) once per step, with the same result "
        "(in training with model.bn: shared); false = every depth runs its whole forward",
    )
    leader_width: int = opt(0, "the Leader's base channels; 0 = the Teammates' width", research=True)
    init: str = opt(
        "",
        "trained weights every net starts from (the Leader: unless model.init_leader): a run or checkpoint folder "
        "(its net of the same role; PATH#net names one), a state dict file of the plain backbone, or "
        "torchvision:<Weights>.<name> for tv_* models; empty = random init (docs/guide/finetune.md)",
    )
    init_leader: str = opt("", "the Leader's trained weights, as model.init; empty = model.init")

    def __post_init__(self) -> None:
        _check_fields("model", self)
        for name in ("in_channels", "num_classes"):
            _positive("model", name, getattr(self, name))
        for name in ("width", "leader_width"):
            _positive("model", name, getattr(self, name), allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class CoopConfig:
    """The cooperative objective: the depths trained and how the nets teach each other. Every rung of the
    ablation ladder is a setting of this section."""

    task: str = opt(
        "cooperative",
        "cooperative = Teammates and Leader trained together | independent = one separate net per depth (the baseline)",
        choices=TASKS,
    )
    scaling_factors: tuple[float, ...] = opt(
        (0.25, 0.5, 0.75, 1.0),
        "the depths trained and evaluated, each a fraction of every stage's blocks; must include 1.0 (the full net)",
    )
    temperature: float = opt(1.0, "the softmax temperature T of every KD term (T = 4 was worse wherever measured)")
    teammates: int = opt(
        2,
        "2 = two Teammates learning from each other (interactive) | 1 = self-learning only",
        choices=(1, 2),
    )
    leader: bool = opt(True, "train a Leader that guides the Teammates (guided learning)")
    sub_nets: bool = opt(True, "train the sub-nets too; false = the full net only (truncated at inference)")
    self_kd: bool = opt(True, "the sub-nets distil from their own full net", research=True)
    alpha: float = opt(1.0, "interactive learning: the weight of each Teammate's KD from the other Teammate")
    beta: float = opt(1.0, "guided learning: the weight of the Teammates' KD from the Leader (needs coop.leader)")
    gamma: float = opt(1.0, "the exponent of the SFSL weights of the sub-nets' losses; 0 = uniform weights")
    leader_kd: float = opt(
        0.0, "the weight of the Leader's KD from the Teammates' mean; 0 = off (needs coop.leader)", research=True
    )
    kd_warmup: float = opt(
        0.3, "the fraction of training over which the KD weights ramp in from 0 (the peer terms: coop.peer_warmup)"
    )
    peer_warmup: float = opt(
        1.0, "the same ramp for the interactive (peer KD) terms; 1.0 = over the whole run (docs/results/8k/RESULTS.md)"
    )
    gate_reg: float = opt(0.0, "the weight of sum_b (g_b - 1)^2 over the learned gates; 0 = off", research=True)
    sub_guided: bool = opt(False, "the sub-nets also distil from the Leader (beta * KD(z_X^s, z_L))", research=True)
    sub_ce: bool = opt(
        True, "the sub-nets learn from the labels too; false = in-place distillation (KD only)", research=True
    )
    kd_norm: bool = opt(
        False,
        "each depth's CE + KD terms divided by the sum of their current weights (a convex mix)",
        research=True,
    )
    kd_mask: str = opt(
        "none",
        "correct = every KD term teaches only on the samples its teacher classifies correctly | none",
        choices=("none", "correct"),
        research=True,
    )
    leader_mode: str = opt(
        "train",
        "train = the Leader learns with the Teammates | frozen = a trained Leader (model.init_leader or "
        "model.init), forward only in eval mode: no loss, no optimizer, no update",
        choices=("train", "frozen"),
    )

    def __post_init__(self) -> None:
        _check_fields("coop", self)
        if not self.scaling_factors:
            raise ValueError("coop.scaling_factors must not be empty")
        for s in self.scaling_factors:
            if not 0.0 < s <= 1.0:
                raise ValueError(f"coop.scaling_factors must be in (0, 1], got {s}")
        if 1.0 not in self.scaling_factors:
            raise ValueError(f"coop.scaling_factors must include 1.0 (the full net), got {list(self.scaling_factors)}")
        if len(set(self.scaling_factors)) != len(self.scaling_factors):
            raise ValueError(f"coop.scaling_factors has duplicates: {list(self.scaling_factors)}")
        _positive("coop", "temperature", self.temperature)
        for name in ("alpha", "beta", "gamma", "leader_kd", "gate_reg"):
            _positive("coop", name, getattr(self, name), allow_zero=True)
        for name in ("kd_warmup", "peer_warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"coop.{name} is a fraction of training in [0, 1], got {getattr(self, name)}")
        if self.beta > 0 and not self.leader:
            raise ValueError("coop.beta > 0 needs coop.leader: true (or set coop.beta: 0)")
        if not self.sub_ce and not (self.self_kd or (self.teammates == 2 and self.alpha > 0)):
            raise ValueError("coop.sub_ce: false leaves the sub-nets no teacher; needs coop.self_kd or alpha > 0")
        if self.leader_kd > 0 and not self.leader:
            raise ValueError("coop.leader_kd > 0 needs coop.leader: true")
        if self.leader_mode == "frozen" and not self.leader:
            raise ValueError("coop.leader_mode: frozen needs coop.leader: true")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images come from, how they are batched and augmented."""

    dataset: str = opt(
        "fashion_mnist", "the dataset loaded in memory (data.shards streams any other)", choices=DATASETS
    )
    root: str = opt("", 'the folder of the Fashion-MNIST IDX .gz files; "" = /usr/share/datasets/fashion-mnist')
    train_subset: int = opt(0, "train on the first N training samples (a fixed, class-balanced prefix); 0 = all")
    val_subset: int = opt(0, "evaluate on the first N test samples; 0 = the full test split")
    batch_size: int = opt(
        128, "training samples per step on each rank: a net's global batch is this times its data-parallel ranks"
    )
    eval_batch_size: int = opt(1000, "samples per evaluation batch")
    augment: bool = opt(True, "random crop with padding and horizontal flip of the training images")
    crop_padding: int = opt(2, "pixels of padding around an image before its random crop")
    shards: str = opt("", "a folder written by `dist-coop shards`: stream from it instead of loading in memory")
    val_split: str = opt("", 'shards: the evaluation split; "" = val if present, else test')
    image_size: int = opt(0, "shards: resize images to this square size; 0 = as stored (then all of one size)")
    workers: int = opt(0, "shards: DataLoader worker processes per rank; 0 = read in the training process")
    on_corrupt: str = opt(
        "error",
        "shards: a sample that does not decode stops the run naming it (error), or is dropped with a warning and "
        "counted in data/corrupt_skipped (skip)",
        choices=ON_CORRUPT,
    )

    def __post_init__(self) -> None:
        _check_fields("data", self)
        for name in ("batch_size", "eval_batch_size"):
            _positive("data", name, getattr(self, name))
        for name in ("train_subset", "val_subset", "crop_padding", "image_size", "workers"):
            _positive("data", name, getattr(self, name), allow_zero=True)
        if self.shards and (self.train_subset or self.val_subset):
            raise ValueError(
                "data.train_subset / val_subset apply to in-memory data; write fewer samples into the shards instead"
            )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimizer, its learning-rate schedule, gradient clipping and mixed precision."""

    name: str = opt("sgd", "sgd (with momentum) or adamw", choices=("sgd", "adamw"))
    lr: float = opt(0.1, "the peak learning rate (reached after optim.warmup_steps)")
    momentum: float = opt(0.9, "sgd: the momentum")
    nesterov: bool = opt(True, "sgd: Nesterov momentum")
    weight_decay: float = opt(5e-4, "weight decay (per step: lr * weight_decay)")
    schedule: str = opt(
        "cosine",
        "the LR after the warmup: cosine to 0 | step (times optim.step_gamma at each optim.milestones) | constant",
        choices=("cosine", "step", "constant"),
    )
    milestones: tuple[float, ...] = opt((0.5, 0.75), "step schedule: the fractions of training where the LR drops")
    step_gamma: float = opt(0.1, "step schedule: the LR's factor at each milestone")
    warmup_steps: int = opt(0, "steps over which the LR rises linearly to optim.lr; 0 = none")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy terms, in [0, 1)")
    grad_clip: float = opt(
        5.0, "the max global gradient norm of a net (times its number of loss terms, optim.clip_scale); 0 = off"
    )
    clip_scale: str = opt(
        "terms",
        "terms = optim.grad_clip times the net's number of loss terms (the same safety net per role) | none",
        choices=("none", "terms"),
        research=True,
    )
    # a net that trains several depths sums a loss per depth on shared weights (SGD; optim.lr_divisors)
    lr_scale: str = opt(
        "blocks_sqrt",
        "the LR of a net that trains several depths: blocks_sqrt = each parameter's LR / sqrt(the depths that run "
        "it) | blocks = / the depths that run it | weighted = blocks, each depth counted by its loss weight | "
        "depths = every parameter's LR / the number of depths | none (docs/results/8k/RESULTS.md)",
        choices=("none", "depths", "blocks", "weighted", "blocks_sqrt"),
        research=True,
    )
    lr_scale_power: float = opt(
        1.0, "depths, blocks, weighted: the LR / d ** power (blocks at 0.5 = blocks_sqrt)", research=True
    )
    keep_decay: bool = opt(
        False,
        "a net that trains several depths: each weight's decay times its LR divisor (optim.lr_scale), so a shared "
        "weight decays per step as a plain net's",
    )
    amp: str = opt(
        "none",
        "mixed precision: none | bf16 | fp16 (CUDA only) | auto: bf16 on a GPU with bf16, fp16 with loss scaling on one without, fp32 on a CPU (both engines)",
        choices=("none", "bf16", "fp16", "auto"),
    )

    def __post_init__(self) -> None:
        _check_fields("optim", self)
        _positive("optim", "lr", self.lr)
        if not 0.0 < self.lr_scale_power <= 1.0:
            raise ValueError(f"optim.lr_scale_power must be in (0, 1], got {self.lr_scale_power}")
        if self.lr_scale_power != 1.0 and self.lr_scale in ("none", "blocks_sqrt"):
            raise ValueError(
                f"optim.lr_scale_power {self.lr_scale_power} needs optim.lr_scale depths, blocks or weighted "
                f"(got {self.lr_scale}; blocks_sqrt is blocks at power 0.5)"
            )
        for name in ("momentum", "weight_decay", "warmup_steps", "grad_clip", "step_gamma"):
            _positive("optim", name, getattr(self, name), allow_zero=True)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise ValueError(f"optim.milestones are fractions of training in (0, 1), got {list(self.milestones)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The run: its length and seed, its folder and checkpoints, evaluation, and how a step executes."""

    epochs: int = opt(1, "passes over the training data")
    max_steps: int = opt(0, "stop after this many steps; 0 = epochs * steps per epoch")
    seed: int = opt(0, "the seed of the nets' initialisation, the data order and the augmentation")
    out_dir: str = opt("runs", "the folder of the run folders (<out_dir>/<run_name>) and of the default MLflow store")
    run_name: str = opt("", "the run folder's name, also the MLflow run's; \"\" = the config file's stem (else run)")
    device: str = opt(
        "auto",
        "the device each process trains on (N: a GPU index; auto = a GPU if present)",
        choices=DEVICES,
        check=check_device,
    )
    threads: int = opt(0, "torch.set_num_threads in each process; 0 = leave as is")
    log_every: int = opt(20, "log the training metrics every N steps")
    eval_every: int = opt(1, "evaluate every N epochs (and after the last step)")
    checkpoint_every: int = opt(0, "save a checkpoint every N steps; 0 = at each epoch end only")
    resume: str = opt(
        "", '"" = start fresh | auto = the latest checkpoint of this run if any | a checkpoint folder to continue'
    )
    overwrite: bool = opt(
        False,
        "a fresh run (or a resume from an earlier checkpoint) in a run folder that holds later checkpoints is "
        "refused; true = the earlier run's files are moved aside to <run>.replaced-<time> first",
    )
    recalibrate_bn: int = opt(0, "after training, recompute each depth's BN statistics on N samples; 0 = off")
    eval_train: bool = opt(
        False,
        "after training, also evaluate every net at every depth on its training samples without augmentation "
        "(train_eval/acc1/<net>@<s> in results.json: how well each depth fits)",
    )
    progress: bool = opt(True, "show a progress bar (on the main rank)")
    on_nonfinite: str = opt(
        "error",
        "a net's loss or gradient is inf/nan: error = stop, naming net and step | skip = drop that net's step",
        choices=ON_NONFINITE,
    )
    max_nonfinite: int = opt(10, "skip: stop after this many consecutive skipped steps of one net")
    backward: str = opt(
        "auto",
        "parts = each net's loss backpropagated part by part as each part is known (one depth's graph alive at a "
        "time, the same gradients) | whole = one backward of the summed loss | auto = parts, except under ZeRO-3",
        choices=("auto", "parts", "whole"),
    )
    compile: str = opt(
        "none",
        "torch.compile of every residual block: none | default | reduce-overhead (CUDA graphs) | max-autotune | "
        "aot_eager (capture only)",
        choices=("none", "default", "reduce-overhead", "max-autotune", "aot_eager"),
    )
    channels_last: bool = opt(
        False, "the channels_last memory format for nets and inputs (with optim.amp: bf16, the fast GPU layout)"
    )

    def __post_init__(self) -> None:
        _check_fields("train", self)
        _positive("train", "epochs", self.epochs)
        for name in ("max_steps", "threads", "checkpoint_every", "recalibrate_bn"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        for name in ("log_every", "eval_every", "max_nonfinite"):
            _positive("train", name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """The placement of the nets on processes, the engine that trains each, and how long ranks wait."""

    placement: str = opt(
        "auto",
        "split = each net on its own ranks | colocated = every rank holds every net | auto = split when the world "
        "size is a multiple (> 1) of the number of nets, else colocated",
        choices=PLACEMENTS,
    )
    engine: str = opt(
        "torch",
        "torch = plain PyTorch, gradients all-reduced per net | deepspeed = DeepSpeed (dist.zero_stage)",
        choices=("torch", "deepspeed"),
    )
    zero_stage: int = opt(
        0,
        "DeepSpeed ZeRO stage: 1 partitions the optimizer state, 2 the gradients too, 3 the parameters too",
        choices=(0, 1, 2, 3),
    )
    deepspeed_extra: dict = opt({}, "a mapping merged over the generated DeepSpeed config")
    backend: str = opt("auto", "auto = nccl on GPUs, gloo on CPUs | gloo | nccl", choices=("auto", "gloo", "nccl"))
    timeout_s: int = opt(600, "seconds a rank waits for the others (joining, any collective) before it stops")
    keep_checkpoints: int = opt(2, "the newest complete checkpoint folders kept in the run folder")

    def __post_init__(self) -> None:
        _check_fields("dist", self)
        _positive("dist", "timeout_s", self.timeout_s)
        _positive("dist", "keep_checkpoints", self.keep_checkpoints)
        if not isinstance(self.deepspeed_extra, dict):
            raise ValueError(f"dist.deepspeed_extra must be a mapping, got {self.deepspeed_extra!r}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Where the metrics go, and what of the final checkpoint MLflow records."""

    backend: str = opt("mlflow", "where the metrics go: an MLflow store, or none", choices=("mlflow", "none"))
    uri: str = opt("", 'the MLflow tracking URI; "" = sqlite:///<train.out_dir>/mlflow.db')
    experiment: str = opt("dist_coop", "the MLflow experiment")
    log_checkpoint: str = opt(
        "reference",
        "the final checkpoint in MLflow: reference = a tag and checkpoint.txt naming its folder | weights = each "
        "net's weights once, no optimizer state | none; its files stay in the run folder",
        choices=CHECKPOINT_MODES,
    )

    def __post_init__(self) -> None:
        _check_fields("tracking", self)


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    coop: CoopConfig = field(default_factory=CoopConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.zero3 and self.train.backward == "parts":
            raise ValueError(
                "train.backward: parts needs DeepSpeed ZeRO stage 0-2 (ZeRO-3 cannot accumulate several backward "
                "calls into one step); use train.backward: auto or whole"
            )
        if self.zero3 and self.train.compile != "none":
            raise ValueError(
                "train.compile with DeepSpeed ZeRO-3 is not supported (its parameter hooks run per module)"
            )

    @property
    def zero3(self) -> bool:
        """DeepSpeed ZeRO stage 3 (parameters partitioned)."""
        return self.dist.engine == "deepspeed" and self.dist.zero_stage == 3

    def part_backward(self) -> bool:
        """Does the loop backpropagate each net's loss in parts (``train.backward``)?"""
        if self.train.backward == "auto":
            return not self.zero3
        return self.train.backward == "parts"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            f.name: {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, f.name)).items()
            }
            for f in dataclasses.fields(self)
        }

    def flat(self) -> dict[str, Any]:
        """``{"coop.alpha": 1.0, ...}``: what the tracker logs as params."""
        return {f"{sec}.{k}": v for sec, values in self.to_dict().items() for k, v in values.items()}


# ---------------------------------------------------------------- loading and validation


def did_you_mean(key: str, valid: typing.Iterable[str]) -> str:
    """``"; did you mean 'alpha'?"``: the valid name nearest ``key`` (any, however far), "" when there is none."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {close[0]!r}?" if close else ""


# Settings that are gone: "section.key" -> (the default it had, what to use instead). A run's stored config lists
# every setting, so one that holds the old default still loads (it asks for nothing); any other value is refused.
REMOVED: dict[str, tuple[Any, str]] = {
    "model.leader_name": ("", "every net has the backbone model.name; a larger Leader: model.leader_width"),
}


def _removed(section: str, key: str, value: Any) -> bool:
    """Is ``section.key`` a removed setting that may be dropped? Refuses it when it asks for something."""
    if f"{section}.{key}" not in REMOVED:
        return False
    default, instead = REMOVED[f"{section}.{key}"]
    if value != default and not (value is None and default == ""):
        raise ValueError(f"{section}.{key} is no longer a setting ({instead}); got {value!r}")
    return True


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path} must be a list of {item.__name__}, got {value!r}")
        return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 and inf as strings
        with contextlib.suppress(ValueError):
            return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{path} must be true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ValueError(f"{path} must be {hint.__name__}, got {value!r}")
    if hint is str and value is None:
        return ""
    if hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ValueError(f"{path} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, section: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"section {section!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names and _removed(section, str(key), value):
            continue
        if key not in names:
            raise ValueError(f"unknown key {section}.{key}{did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def setting_path(path: str) -> tuple[str, str | None]:
    """``"optim"`` -> ``("optim", None)``, ``"optim.lr"`` -> ``("optim", "lr")``; an unknown section or key is
    refused naming the nearest valid one, as in a config file."""
    section, _, key = path.partition(".")
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}{did_you_mean(section, SECTIONS)}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key and key not in names:
        if path in REMOVED:
            raise ValueError(f"{path} is no longer a setting ({REMOVED[path][1]})")
        raise ValueError(f"unknown key {section}.{key}{did_you_mean(key, names)}")
    return section, key or None


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ValueError(f"unknown section {key!r}{did_you_mean(str(key), SECTIONS)}")
    return Config(**{name: _build(cls, name, raw.get(name)) for name, cls in SECTIONS.items()})


def parse_overrides(args: typing.Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["--coop.alpha=0.5", "--train.epochs", "3"]`` -> ``{"coop": {"alpha": 0.5}, "train": {"epochs": 3}}``."""
    out: dict[str, dict[str, Any]] = {}
    items = list(args)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"overrides look like --section.key=value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ValueError(f"override {arg!r} has no value")
            key, text = arg[2:], items[i + 1]
            i += 1
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            mark = _mark(e)
            where = f" (column {mark.column + 1} of {text!r})" if mark else ""
            raise ValueError(
                f"override --{key}={text} does not parse as a YAML value: {_yaml_problem(e)}{where}"
            ) from e
        out.setdefault(section, {})[name] = value
        i += 1
    return out


def _mark(e: yaml.YAMLError) -> yaml.Mark | None:
    return getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML says went wrong, on one line: "while parsing a flow sequence started at ..., expected ..."."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    context = e.context or ""
    problem, mark = e.problem or "", e.problem_mark
    if context and e.context_mark and (mark is None or e.context_mark.line != mark.line):
        context += f" started at line {e.context_mark.line + 1}, column {e.context_mark.column + 1}"
    return ", ".join(" ".join(part.split()) for part in (context, problem) if part) or "invalid YAML"


def _read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a file; a syntax error names the file, line and column."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file (byte {e.start} is not UTF-8)") from e
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = _mark(e)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"YAML error in {path}{where}: {_yaml_problem(e)}") from e


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load YAML ``path`` (or the defaults), apply ``--section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"config {path} is a folder, not a YAML file")
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config must be a mapping of sections")
    for section, values in parse_overrides(overrides).items():
        if section not in SECTIONS:
            raise ValueError(f"unknown section {section!r}{did_you_mean(section, SECTIONS)}")
        current = raw.setdefault(section, {}) or {}
        current.update(values)
        raw[section] = current
    cfg = config_from_dict(raw)
    if path is not None and not cfg.train.run_name:
        cfg = replace(cfg, train={"run_name": Path(path).stem})
    return cfg


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some fields of some sections changed (validated again)."""
    raw = cfg.to_dict()
    for name, values in sections.items():
        raw[name].update(values)
    return config_from_dict(raw)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
