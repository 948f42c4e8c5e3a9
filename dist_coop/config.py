"""Configuration: one frozen, keyword-only dataclass per section, loaded from plain YAML.

YAML is read with ``yaml.safe_load`` (no code-executing tags). Every value is checked on load:
an unknown key names the nearest valid one, a wrong type or a bad value names the field.
Command-line overrides look like ``--coop.alpha=0.5`` (the value is parsed as YAML).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The choices, as data: this module imports nothing of the package (every other module may import it). The
# modules that implement a choice check their own arguments too; tests/test_config.py checks the lists agree.
MODEL_NAMES = (  # dist_coop.models.registry.MODELS
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet18_64",
    "resnet34_64",
    "tv_resnet18",
    "tv_resnet34",
    "tv_resnet50",
)
KEEP_MODES = ("prefix", "spread")  # dist_coop.models.masks
GATE_MODES = ("learned", "none")  # dist_coop.models.adaptive
BN_MODES = ("shared", "private")  # dist_coop.models.norm
HEAD_MODES = ("shared", "private")  # dist_coop.models.head
TASKS = ("cooperative", "independent")  # dist_coop.coop.task
DATASETS = ("fashion_mnist",)  # dist_coop.data


def _choice(section: str, name: str, value: object, choices: typing.Iterable[object]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {choices}, got {value!r}")


def _finite(section: str, obj: object) -> None:
    """Every float of a section (and every float in its lists) is finite: inf and nan slip past range checks."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{section}.{f.name} must be finite, got {v}")


DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def check_device(value: str, name: str = "train.device") -> None:
    """A device name this project runs on (whether that device is present is checked at start)."""
    if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"{name} must be one of {', '.join(DEVICES)} (N: a GPU index), got {value!r}")


def _model_name(name: str, field: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"{field}: unknown model {name!r}; available: {sorted(MODEL_NAMES)}")


def _positive(section: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "resnet32"
    width: int = 0  # base channels; 0 = the backbone's default
    in_channels: int = 3
    num_classes: int = 10
    keep: str = "prefix"  # prefix | spread
    gate: str = "learned"  # learned | none
    bn: str = "shared"  # shared (per-depth statistics) | private (switchable BN)
    zero_init: bool = False  # skippable blocks start as the identity (last BN of the branch zeroed)
    head_norm: bool = True  # BN (per-depth statistics) on the pooled features before the shared classifier
    head: str = "shared"  # shared classifier | private: each trained depth its own (nets trained at one depth: shared)
    # compute what several depths compute alike (stem, common blocks) once per step; exact, see
    # AdaptiveNet.branch_starts (it applies in training with bn: shared); false = every depth its whole forward
    share_prefix: bool = True
    leader_name: str = ""  # "" = same backbone as the Teammates
    leader_width: int = 0  # 0 = same width as the Teammates

    def __post_init__(self) -> None:
        _finite("model", self)
        _model_name(self.name, "model.name")
        if self.leader_name:
            _model_name(self.leader_name, "model.leader_name")
        _choice("model", "keep", self.keep, KEEP_MODES)
        _choice("model", "gate", self.gate, GATE_MODES)
        _choice("model", "bn", self.bn, BN_MODES)
        _choice("model", "head", self.head, HEAD_MODES)
        for name in ("in_channels", "num_classes"):
            _positive("model", name, getattr(self, name))
        for name in ("width", "leader_width"):
            _positive("model", name, getattr(self, name), allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class CoopConfig:
    """The cooperative objective (DESIGN.md section 1); every rung of the ablation ladder is a setting."""

    task: str = "cooperative"  # cooperative | independent (one separate net per depth)
    scaling_factors: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    temperature: float = 1.0  # T = 4 was worse wherever measured (docs/RESULTS.md)
    teammates: int = 2  # 1 = self-learning only, 2 = interactive learning
    leader: bool = True  # guided learning
    sub_nets: bool = True  # False = train the full net only (truncate at inference)
    self_kd: bool = True  # sub-nets distil from their own full net
    alpha: float = 1.0  # interactive: weight of KD from the other Teammate
    beta: float = 1.0  # guided: weight of KD from the Leader
    gamma: float = 1.0  # SFSL exponent; 0 = uniform weights
    leader_kd: float = 0.0  # Leader's KD from the Teammates' mean (off by default)
    kd_warmup: float = 0.3  # fraction of training over which KD weights ramp in from 0 (peer: peer_warmup)
    peer_warmup: float = 1.0  # the same for the interactive (peer KD) terms: over the whole run (docs/RESULTS.md)
    gate_reg: float = 0.0  # weight of sum_b (g_b - 1)^2 over the learned gates (0 = off)
    sub_guided: bool = False  # sub-nets also distil from the Leader (beta * KD(z_X^s, z_L))
    sub_ce: bool = True  # sub-nets learn from the labels too; False = in-place distillation (KD only)
    kd_norm: bool = False  # each depth's CE + KD terms divided by the sum of their current weights (a convex mix)
    # none | correct: every KD term teaches only on the samples its teacher classifies correctly (coop/losses.py)
    kd_mask: str = "none"

    def __post_init__(self) -> None:
        _finite("coop", self)
        _choice("coop", "task", self.task, TASKS)
        if not self.scaling_factors:
            raise ValueError("coop.scaling_factors must not be empty")
        for s in self.scaling_factors:
            if not 0.0 < s <= 1.0:
                raise ValueError(f"coop.scaling_factors must be in (0, 1], got {s}")
        if 1.0 not in self.scaling_factors:
            raise ValueError(f"coop.scaling_factors must include 1.0 (the full net), got {list(self.scaling_factors)}")
        if len(set(self.scaling_factors)) != len(self.scaling_factors):
            raise ValueError(f"coop.scaling_factors has duplicates: {list(self.scaling_factors)}")
        _choice("coop", "teammates", self.teammates, (1, 2))
        _choice("coop", "kd_mask", self.kd_mask, ("none", "correct"))
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


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str = ""  # folder with the IDX .gz files; "" = /usr/share/datasets/fashion-mnist
    train_subset: int = 0  # first N training samples (0 = all); a fixed, class-balanced prefix
    val_subset: int = 0  # 0 = the full test split
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: bool = True  # random crop with padding + horizontal flip, on tensors
    crop_padding: int = 2
    shards: str = ""  # a folder written by `dist-coop shards`: stream from it instead of loading in memory
    val_split: str = ""  # shards: the evaluation split ("" = val if present, else test)
    image_size: int = 0  # shards: resize images to this square size (0 = as stored; must be uniform)
    workers: int = 0  # shards: DataLoader workers per rank
    on_corrupt: str = "error"  # shards: error | skip (warn, count in data/corrupt_skipped, drop the sample)

    def __post_init__(self) -> None:
        _finite("data", self)
        _choice("data", "dataset", self.dataset, DATASETS)
        for name in ("batch_size", "eval_batch_size"):
            _positive("data", name, getattr(self, name))
        for name in ("train_subset", "val_subset", "crop_padding", "image_size", "workers"):
            _positive("data", name, getattr(self, name), allow_zero=True)
        _choice("data", "on_corrupt", self.on_corrupt, ("error", "skip"))
        if self.shards and (self.train_subset or self.val_subset):
            raise ValueError(
                "data.train_subset / val_subset apply to in-memory data; write fewer samples into the shards instead"
            )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training
    step_gamma: float = 0.1
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    grad_clip: float = 5.0  # max global grad norm per net (per loss term with clip_scale: terms); 0 = off
    clip_scale: str = "terms"  # terms: grad_clip * the net's number of loss terms (same safety net per role) | none
    # a net that trains several depths sums a loss per depth on shared weights (SGD; optim.lr_divisors):
    # depths = its LR / the number of depths | blocks = each parameter's LR / the depths that run it
    # | weighted = blocks with each depth counted by its loss weight (SFSL w(s), 1 at full depth)
    # | blocks_sqrt (default) = each parameter's LR / sqrt(the depths that run it): docs/RESULTS.md, eighth pass | none
    lr_scale: str = "blocks_sqrt"
    lr_scale_power: float = 1.0  # depths / blocks / weighted: the LR / d ** power (blocks at 0.5 = blocks_sqrt)
    keep_decay: bool = False  # with lr_scale, weight decay x the LR divisor: a shared weight decays as a plain net's
    amp: str = "none"  # none | bf16 | fp16 (fp16 only on CUDA) | auto (bf16 where supported)

    def __post_init__(self) -> None:
        _finite("optim", self)
        _choice("optim", "name", self.name, ("sgd", "adamw"))
        _choice("optim", "schedule", self.schedule, ("cosine", "step", "constant"))
        _choice("optim", "amp", self.amp, ("none", "bf16", "fp16", "auto"))
        _choice("optim", "clip_scale", self.clip_scale, ("none", "terms"))
        _choice("optim", "lr_scale", self.lr_scale, ("none", "depths", "blocks", "weighted", "blocks_sqrt"))
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
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs * steps per epoch; else stop after this many steps
    seed: int = 0
    out_dir: str = "runs"
    run_name: str = ""  # "" = the config file's stem
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    log_every: int = 20  # steps
    eval_every: int = 1  # epochs
    checkpoint_every: int = 0  # steps; 0 = at each epoch end only
    resume: str = ""  # "" = start fresh, "auto" = latest checkpoint of this run if any, or a checkpoint folder
    # a fresh run (or a resume from an earlier checkpoint) in a run folder that holds later checkpoints is refused;
    # true: the earlier run's files are moved aside to <run>.replaced-<time> first
    overwrite: bool = False
    recalibrate_bn: int = 0  # after training, recompute each depth's BN statistics on N samples
    # after training, also evaluate every net at every depth on its training samples without augmentation
    # (train_eval/acc1/<net>@<s> in results.json beside val/...: how well each depth fits, the fit gap)
    eval_train: bool = False
    progress: bool = True
    on_nonfinite: str = "error"  # a net's loss or gradient is inf/nan: error (stop, naming it) | skip (drop its step)
    max_nonfinite: int = 10  # skip: stop after this many consecutive skipped steps of one net
    # parts: each net's loss backpropagated part by part as soon as each part is known (one depth's graph
    # alive at a time; the same gradients); whole: one backward of the summed loss. auto: parts, except under
    # DeepSpeed ZeRO-3, which cannot accumulate several backward calls into one step here
    backward: str = "auto"
    # the GPU step (unmeasured here: no GPU was lent; see README "Benchmarks"): torch.compile of every residual
    # block (none | default | reduce-overhead (CUDA graphs) | max-autotune | aot_eager, capture only) and the
    # channels_last memory format for nets and inputs (with optim.amp: bf16, the fast conv layout on GPUs)
    compile: str = "none"
    channels_last: bool = False

    def __post_init__(self) -> None:
        _finite("train", self)
        check_device(self.device)
        _positive("train", "epochs", self.epochs)
        for name in ("max_steps", "threads", "checkpoint_every", "recalibrate_bn"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        for name in ("log_every", "eval_every", "max_nonfinite"):
            _positive("train", name, getattr(self, name))
        _choice("train", "on_nonfinite", self.on_nonfinite, ("error", "skip"))
        _choice("train", "backward", self.backward, ("auto", "parts", "whole"))
        _choice("train", "compile", self.compile, ("none", "default", "reduce-overhead", "max-autotune", "aot_eager"))


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """Placement of the nets on processes and the engine that trains each (DESIGN.md section 2)."""

    placement: str = "auto"  # auto | split | colocated
    engine: str = "torch"  # torch (plain PyTorch, gradients all-reduced per net group) | deepspeed
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    deepspeed_extra: dict = field(default_factory=dict)  # merged over the generated DeepSpeed config
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPUs) | gloo | nccl
    timeout_s: int = 600  # seconds a rank waits for the others (joining, any collective) before it fails
    keep_checkpoints: int = 2  # newest checkpoint folders kept

    def __post_init__(self) -> None:
        _finite("dist", self)
        _choice("dist", "placement", self.placement, ("auto", "split", "colocated"))
        _choice("dist", "engine", self.engine, ("torch", "deepspeed"))
        _choice("dist", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("dist", "backend", self.backend, ("auto", "gloo", "nccl"))
        _positive("dist", "timeout_s", self.timeout_s)
        _positive("dist", "keep_checkpoints", self.keep_checkpoints)
        if not isinstance(self.deepspeed_extra, dict):
            raise ValueError(f"dist.deepspeed_extra must be a mapping, got {self.deepspeed_extra!r}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | none
    uri: str = ""  # "" = sqlite:///<train.out_dir>/mlflow.db
    experiment: str = "dist_coop"
    # the final checkpoint in MLflow: reference (a tag and checkpoint.txt naming its folder) | weights (each net's
    # weights, once, no optimizer state) | none; its files stay in the run folder (dist.keep_checkpoints)
    log_checkpoint: str = "reference"

    def __post_init__(self) -> None:
        _finite("tracking", self)
        _choice("tracking", "backend", self.backend, ("mlflow", "none"))
        _choice("tracking", "log_checkpoint", self.log_checkpoint, ("reference", "weights", "none"))  # track.base


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


def _nearest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {close[0]!r}?" if close else ""


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
        if key not in names:
            raise ValueError(f"unknown key {section}.{key}{_nearest(str(key), names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ValueError(f"unknown section {key!r}{_nearest(str(key), SECTIONS)}")
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
            raise ValueError(f"unknown section {section!r}{_nearest(section, SECTIONS)}")
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
