"""``dist-coop plan`` and the checks every launch makes before its first step: one code path for both.

A run that fails at its first evaluation has trained a whole epoch first. What a launch can know before its first
step is checked by ``preflight``, which ``dist-coop train`` (``cli.run_training``, on every rank) and ``dist-coop
plan`` (for a world it does not start) both call. Each refusal is one line naming the setting and the way out:

* the precision (``dist_coop/precision.py``), the placement and the engine (``placement.plan_placement``,
  ``check_engine_support``), and a resumed run's data shards (``resize.check_data_shards``);
* the data: the shard index (or the in-memory dataset's files), channels and classes against the model, image sizes;
* training shards against data shards x loader workers (every loader worker of every exchange group reads its own
  shards), and training samples against one global batch;
* evaluation shards against a net's group: ``Trainer.evaluate`` reads each validation shard on one rank of a net's
  group (``split_batches(...).sharded(group_rank, group_size)``), so the group needs at least that many shards;
* the run folder (writable or creatable; an earlier run's checkpoints) and the MLflow store's folder (SQLite).

``Plan`` is the answer: who holds which net, batches, steps, precision, shards needed against present; ``plan_lines``
adds the learning rates and the checkpoint size from the nets built on the meta device, and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_coop.checkpoint import TrainerState, resolve_resume
from dist_coop.config import Config, DataConfig, load_config
from dist_coop.coop.task import build_task
from dist_coop.distributed.env import DistInfo
from dist_coop.distributed.placement import Placement, check_engine_support, placement_line, plan_placement
from dist_coop.distributed.resize import check_data_shards
from dist_coop.footprint import NetBytes, describe, megabytes, net_bytes
from dist_coop.optim import lr_divisors
from dist_coop.precision import precision_line, resolve_precision
from dist_coop.run import check_fresh_start, run_dir


@dataclass(frozen=True)
class DataFacts:
    """What a launch needs to know of its data, read without loading it."""

    where: str  # the shard folder, or the in-memory dataset's folder
    val_split: str
    counts: dict[str, int]  # split -> samples
    shards: dict[str, int]  # split -> shard files ({} in memory)
    channels: int
    num_classes: int
    image: str  # "64x64": as the nets see the images


def data_facts(cfg: DataConfig) -> DataFacts:
    """The data's counts, shards, channels and classes, from ``index.json`` or the IDX labels (nothing decoded)."""
    if not cfg.shards:
        from dist_coop.data import fashion_mnist as fm

        root = fm.find_root(cfg.root)
        full = {split: len(fm.read_idx(root / fm.FILES[split][1])) for split in fm.FILES}
        counts = {"train": min(full["train"], cfg.train_subset or full["train"])}
        counts["test"] = min(full["test"], cfg.val_subset or full["test"])
        return DataFacts(f"{root} (in memory)", "test", counts, {}, 1, len(fm.CLASSES), "28x28")
    from dist_coop.data.shards import check_image_sizes, read_index

    index = read_index(cfg.shards)
    splits = index["splits"]
    val = cfg.val_split or ("val" if "val" in splits else "test")
    for split, setting in (("train", "the training split"), (val, "data.val_split")):
        if split not in splits:
            raise ValueError(f"shards in {cfg.shards} have no split {split!r} ({setting}; they have {list(splits)})")
    check_image_sizes(index, ("train", val), cfg.image_size, cfg.shards)
    stored = next(iter(splits["train"].get("sizes") or {"?": 0}))
    image = f"{cfg.image_size}x{cfg.image_size}" if cfg.image_size else stored
    counts = {s: splits[s]["count"] for s in ("train", val)}
    shards = {s: len(splits[s]["shards"]) for s in ("train", val)}
    return DataFacts(str(cfg.shards), val, counts, shards, len(index["mean"]), len(index["classes"]), image)


@dataclass(frozen=True)
class Plan:
    """What a launch of ``cfg`` on ``placement.world_size`` ranks will do, found before any work."""

    cfg: Config
    placement: Placement
    device: torch.device
    precision: str
    precision_line: str
    data: DataFacts
    data_shards: int  # the run's data shards: this launch's exchange groups, or those a resumed run started with
    micro_batch: int  # samples per rank per step
    steps_per_epoch: int
    total_steps: int
    run_dir: Path
    resume: Path | None
    tracking: str  # the MLflow store; "" when tracking is off

    @property
    def global_batch(self) -> int:
        """Samples per step of each net: its data-parallel ranks x the micro-batch."""
        return self.micro_batch * self.placement.num_shards

    @property
    def eval_group(self) -> int:
        """The ranks of a net's group, over which evaluation splits the validation shards."""
        return len(self.placement.net_ranks(self.placement.net_names[0]))

    def start_lines(self) -> list[str]:
        """What rank 0 prints at the start of training: the layout and the precision."""
        return [placement_line(self.placement, self.micro_batch), self.precision_line]


def preflight(cfg: Config, *, world_size: int, device: torch.device | str, bf16: bool | None = None) -> Plan:
    """Every check a launch of ``cfg`` on ``world_size`` ranks can make before its first step; the ``Plan`` if all
    hold, else a ValueError (FileNotFoundError for missing data) of one line naming the setting and the way out.

    ``bf16``: whether the GPUs have bf16, for a plan made where they cannot be asked (None: ask ``device``).
    """
    device = torch.device(device)
    precision = resolve_precision(cfg.optim.amp, device, bf16=bf16)
    names = [spec.name for spec in build_task(cfg.coop).specs]
    placement = plan_placement(cfg.dist.placement, world_size, names)
    check_engine_support(placement, cfg.dist.engine, cfg.dist.zero_stage)
    folder = run_dir(cfg.train)
    resume = resolve_resume(cfg.train.resume, folder)
    data_shards = (TrainerState.load(resume).data_shards if resume else 0) or placement.num_shards
    check_data_shards(data_shards, placement, cfg.dist.placement)
    data = data_facts(cfg.data)
    if (cfg.model.in_channels, cfg.model.num_classes) != (data.channels, data.num_classes):
        raise ValueError(
            f"model.in_channels/num_classes are {cfg.model.in_channels}/{cfg.model.num_classes} but the data in "
            f"{data.where} has {data.channels} channels and {data.num_classes} classes; set them to match"
        )
    batch, train_count = cfg.data.batch_size, data.counts["train"]
    if data.shards:
        _check_train_shards(cfg.data, data, data_shards)
    if train_count // data_shards < batch:
        raise ValueError(
            f"train: {train_count} samples cannot fill a batch of {batch} (data.batch_size) on each of {data_shards} "
            f"data shards; use data.batch_size {max(1, train_count // data_shards)} or fewer ranks"
        )
    group = len(placement.net_ranks(names[0]))
    if data.shards:
        _check_eval_shards(data, data.val_split, group, placement)
        if cfg.train.eval_train:  # train.eval_train evaluates the training split the same way
            _check_eval_shards(data, "train", group, placement)
    check_writable(Path(cfg.train.out_dir), "train.out_dir")
    if not cfg.train.overwrite:
        check_fresh_start(folder, resume)
    tracking = tracking_store(cfg)
    steps = train_count // (batch * data_shards)
    total = cfg.train.epochs * steps if not cfg.train.max_steps else min(cfg.train.epochs * steps, cfg.train.max_steps)
    return Plan(
        cfg=cfg,
        placement=placement,
        device=device,
        precision=precision,
        precision_line=precision_line(cfg.optim.amp, device, bf16=bf16, assumed=bf16 is not None),
        data=data,
        data_shards=data_shards,
        micro_batch=batch * data_shards // placement.num_shards,
        steps_per_epoch=steps,
        total_steps=total,
        run_dir=folder,
        resume=resume,
        tracking=tracking,
    )


def _check_train_shards(cfg: DataConfig, data: DataFacts, data_shards: int) -> None:
    have, workers = data.shards["train"], max(1, cfg.workers)
    need = data_shards * workers
    if have >= need:
        return
    fewer = f" or data.workers: {have // data_shards}" if have >= data_shards else ""
    raise ValueError(
        f"train: {have} shard(s) in {data.where} for {data_shards} data shard(s) x {workers} loader worker(s) "
        f"(data.workers): each reads its own shards; write at least {need} training shards (dist-coop shards "
        f"--max-count {max(1, data.counts['train'] // need)} or less){fewer}"
    )


def _check_eval_shards(data: DataFacts, split: str, group: int, placement: Placement) -> None:
    have = data.shards[split]
    if have >= group:
        return
    n = len(placement.net_names)
    layout = f"{placement.kind} on {placement.world_size} ranks"
    count = data.counts[split]
    rewrite = (
        f"write at least {group} {split} shards (dist-coop shards --max-count {count // group} or less)"
        if count >= group
        else f"the split has only {count} samples"
    )
    raise ValueError(
        f"{split}: {have} shard(s) in {data.where}, but evaluation reads each on one rank of a net's group of {group} "
        f"ranks ({layout}), so the first evaluation would fail; {rewrite}, or use net groups of at most {have} "
        f"ranks (colocated on up to {have} ranks, or split on a multiple of {n} up to {n * have})"
    )


def check_writable(path: Path, setting: str) -> None:
    """``path`` is a folder this process can write in, or can create (its nearest existing parent is writable)."""
    path = path.absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{setting}: {path} cannot be created, {probe} is a file; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        verb = "cannot write in" if probe == path else f"cannot create it in {probe}:"
        raise ValueError(
            f"{setting}: {path}: {verb} permission denied or a read-only file system; give a folder you can write"
        )


def tracking_store(cfg: Config) -> str:
    """The MLflow store a run opens ("" when tracking is off); a SQLite store's folder must be writable."""
    if cfg.tracking.backend == "none":
        return ""
    from dist_coop.track.mlflow_tracker import default_uri
    from dist_coop.track.store import sqlite_path

    uri = cfg.tracking.uri or default_uri(cfg.train.out_dir)
    db = sqlite_path(uri)
    if db is not None:
        check_writable(db.parent, "tracking.uri")
        if db.exists() and not os.access(db, os.W_OK):
            raise ValueError(f"tracking.uri: {db} cannot be written (permission denied or a read-only file system)")
    return uri


# ---------------------------------------------------------------- dist-coop plan


def plan_lines(plan: Plan, nnodes: int = 1, nproc_per_node: int | None = None) -> list[str]:
    """The plan as printed by ``dist-coop plan``: the nets are built on the meta device for their LRs and sizes."""
    cfg, p = plan.cfg, plan.placement
    nproc = nproc_per_node or p.world_size
    task = build_task(cfg.coop)
    with torch.device("meta"):
        nets = {spec.name: spec.build(cfg.model, cfg.coop.scaling_factors) for spec in task.specs}
    lines = [f"world: {nnodes} node(s) x {nproc} process(es) = {p.world_size} rank(s), device {plan.device.type}"]
    lines += plan.start_lines()
    if nnodes > 1:
        for node in range(nnodes):
            ranks = range(node * nproc, (node + 1) * nproc)
            held = sorted({name for r in ranks for name in p.nets_of(r)}, key=p.net_names.index)
            lines.append(f"  node {node} (ranks {ranks[0]}-{ranks[-1]}): {', '.join(held)}")
    zero = f" ZeRO-{cfg.dist.zero_stage}" if cfg.dist.engine == "deepspeed" else ""
    lines.append(
        f"engine: {cfg.dist.engine}{zero}, one per net over its {plan.eval_group} rank(s); micro-batch "
        f"{plan.micro_batch} per rank, global batch {plan.global_batch} per net ({p.num_shards} x {plan.micro_batch})"
    )
    lines.append(lr_line(cfg, task.specs, nets))
    d = plan.data
    lines.append(
        f"steps: {plan.steps_per_epoch} per epoch ({d.counts['train']} training samples // {plan.data_shards} data "
        f"shard(s) // {cfg.data.batch_size}) x {cfg.train.epochs} epochs = {plan.total_steps} steps"
    )
    if d.shards:
        workers = max(1, cfg.data.workers)
        lines.append(
            f"shards in {d.where}: train {d.shards['train']} present, {plan.data_shards * workers} needed "
            f"({plan.data_shards} data shard(s) x {workers} loader worker(s)); {d.val_split} {d.shards[d.val_split]} "
            f"present, {plan.eval_group} needed (evaluation over a net's group of {plan.eval_group} rank(s))"
        )
    lines.append(
        f"data: {d.counts[d.val_split]} {d.val_split} samples; images {d.image}, {d.channels} channel(s), "
        f"{d.num_classes} classes"
    )
    sizes = [
        net_bytes(
            name,
            net,
            optimizer=cfg.optim.name,
            momentum=cfg.optim.momentum,
            engine=cfg.dist.engine,
            zero_stage=cfg.dist.zero_stage,
            precision=plan.precision,
            group_size=plan.eval_group,
        )
        for name, net in nets.items()
    ]
    total, keep = sum(b.total for b in sizes), cfg.dist.keep_checkpoints
    every = f"every {cfg.train.checkpoint_every} steps and " if cfg.train.checkpoint_every else ""
    lines.append(
        f"checkpoints: {plan.run_dir / 'checkpoints'}/step_N/, {every}at each epoch's end; {megabytes(total)} each, "
        f"{keep} kept (dist.keep_checkpoints): {megabytes(total * keep)}"
    )
    alike: dict[NetBytes, list[str]] = {}  # nets of one size on one line
    for b in sizes:
        alike.setdefault(dataclasses.replace(b, name=""), []).append(b.name)
    lines += [
        f"  {describe(dataclasses.replace(b, name=', '.join(names)), cfg.optim.name)}" for b, names in alike.items()
    ]
    start = f"from {plan.resume} (train.resume {cfg.train.resume})" if plan.resume else "a fresh run"
    lines.append(f"run folder: {plan.run_dir} ({start}); MLflow: {plan.tracking or 'off (tracking.backend none)'}")
    return lines


def lr_line(cfg: Config, specs, nets: dict[str, torch.nn.Module]) -> str:
    """The learning rate each net's weights get: ``optim.lr`` (not scaled with the global batch) and
    ``optim.lr_scale``'s division on weights several depths share (``dist_coop.optim.lr_divisors``)."""
    o = cfg.optim
    warmup = f", {o.warmup_steps} warm-up steps" if o.warmup_steps else ""
    ranges: dict[str, list[str]] = {}
    for spec in specs:
        divisors = lr_divisors(nets[spec.name], o, spec.trained_weights()).values() or [1.0]
        low, high = o.lr / max(divisors), o.lr / min(divisors)
        ranges.setdefault(f"{low:.4g}" if low == high else f"{low:.4g}-{high:.4g}", []).append(spec.name)
    per_net = "; ".join(f"{', '.join(names)} {lr}" for lr, names in ranges.items())
    return (
        f"learning rate: optim.lr {o.lr:g} ({o.name}, {o.schedule}{warmup}), the same at any global batch; "
        f"optim.lr_scale {o.lr_scale}: {per_net}"
    )


def add_parser(sub, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """``dist-coop plan``."""
    p = sub.add_parser(
        "plan",
        parents=parents or [],
        help="what a training launch would do on M nodes x N processes, and what it would refuse; starts nothing",
    )
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun --nnodes)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (torchrun --nproc_per_node)")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="what each rank trains on (default cuda; optim.amp auto assumes GPUs with bf16 when none is visible)",
    )


def plan_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """Print the plan of a launch, or raise the one-line refusal ``dist-coop train`` would give."""
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise ValueError(f"--nnodes and --nproc-per-node must be >= 1, got {args.nnodes} and {args.nproc_per_node}")
    cfg = load_config(args.config, overrides)
    device = torch.device(args.device)
    bf16 = None if device.type != "cuda" or torch.cuda.is_available() else True  # GPUs not visible here: assumed
    plan = preflight(cfg, world_size=args.nnodes * args.nproc_per_node, device=device, bf16=bf16)
    print("\n".join(plan_lines(plan, args.nnodes, args.nproc_per_node)))
    return 0


def preflight_all_ranks(cfg: Config, info: DistInfo) -> Plan:
    """``preflight`` on every rank of a launch: a refusal found on any rank is raised on every rank (one that went
    on alone would wait in its first collective until ``dist.timeout_s``). Collective when there are several ranks."""
    plan, error = None, None
    try:
        plan = preflight(cfg, world_size=info.world_size, device=info.device)
    except (ValueError, FileNotFoundError) as e:
        error = e
    found = [str(error) if error else ""]
    if info.initialized and info.world_size > 1:
        found = [""] * info.world_size
        torch.distributed.all_gather_object(found, str(error) if error else "")
    rank, line = next(((r, e) for r, e in enumerate(found) if e), (0, ""))
    if not line:
        return plan
    if error is not None and str(error) == line:
        raise error
    raise ValueError(f"rank {rank}: {line}" if rank else line)
