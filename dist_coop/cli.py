"""``dist-coop train|plan|config|eval|shards|profile|budget|export|stream|ui``: the command line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dist_coop.checkpoint import TrainerState, resolve_resume
from dist_coop.config import Config, load_config
from dist_coop.data import build_data
from dist_coop.distributed.comm import broadcast_text
from dist_coop.distributed.env import DistInfo, close_distributed, init_distributed, peer_failure, resolve_device
from dist_coop.durable import DiskFullError, disk_full_line, error_chain, is_disk_full
from dist_coop.evaluate import EVAL_SPLITS, METRIC_PREFIX, evaluate_sums, results_table, split_batches, sums_to_metrics
from dist_coop.guard import NonFiniteError
from dist_coop.infer.cost import cost_metrics
from dist_coop.plan import preflight_all_ranks
from dist_coop.preempt import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, StopSignal, interrupted
from dist_coop.report import finish
from dist_coop.run import load_run, prepare_run_dir
from dist_coop.run import run_dir as run_dir_of_config
from dist_coop.runlock import RunLock
from dist_coop.track import FAILED, FINISHED, KILLED, Tracker, TrackingError, build_tracker, error_line
from dist_coop.trainer import Trainer, resolve_amp


def run_training(cfg: Config, info: DistInfo | None = None) -> dict[str, Any]:
    """Config -> distributed init -> data -> Trainer -> train -> results. The whole job of one process."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    own_group = info is None
    if info is None:  # the device is checked first: a missing GPU is refused before anything is written
        info = init_distributed(
            cfg.train.device,
            backend=cfg.dist.backend,
            need_group=cfg.dist.engine == "deepspeed",
            timeout_s=cfg.dist.timeout_s,
        )
    # SIGTERM: every rank stops at the next step boundary, saves and raises Preempted (dist_coop/preempt.py)
    with StopSignal() as stop:
        lock = None
        try:
            launch = preflight_all_ranks(cfg, info)  # what can be checked before the first step is (dist_coop/plan.py)
            if info.is_main:
                print("\n".join(launch.start_lines()), flush=True)
            lock, run_dir, resume = claim_run_folder(cfg, info)
            data = build_data(cfg.data, seed=cfg.train.seed, device=info.device)
            run_id = TrainerState.load(resume).mlflow_run_id if resume else ""
            tracker = build_tracker(
                cfg.tracking,
                run_name=cfg.train.run_name,
                out_dir=cfg.train.out_dir,
                run_id=run_id,
                enabled=info.is_main,
            )
            try:
                trainer = Trainer(
                    cfg,
                    data,
                    run_dir=run_dir,
                    dist=info,
                    tracker=tracker,
                    stop_requested=stop.requested,
                    data_shards=TrainerState.load(resume).data_shards if resume else None,
                )
                if resume:
                    trainer.resume(resume)
                tracker.log_params({**cfg.flat(), **trainer.launch_params()})
                results = finish(trainer, trainer.train())
            except BaseException as e:
                end_run(tracker, e)
                raise
            end_run(tracker)
            if info.is_main and tracker.uri:
                print(f"MLflow run {tracker.run_id} in {tracker.uri}; browse it with: dist-coop ui {run_dir}")
            return results
        finally:
            if lock is not None:
                lock.release()
            if own_group:
                close_distributed(info)


def claim_run_folder(cfg: Config, info: DistInfo) -> tuple[RunLock | None, Path, Path | None]:
    """The rank that writes locks the run folder for the run's life and checks that this run may write there
    (``prepare_run_dir``); a refusal is raised alike on every rank. Returns the lock (that rank's), the folder
    and the checkpoint to resume from."""
    folder, lock, error = run_dir_of_config(cfg.train), None, ""
    if info.is_main:
        try:
            lock = RunLock(folder).acquire()
            if lock.taken_over:
                print(
                    f"dist-coop: warning: taking over the lock of {folder} left by {lock.taken_over}, which is gone",
                    file=sys.stderr,
                )
            prepare_run_dir(cfg, True, resolve_resume(cfg.train.resume, folder))
        except (ValueError, OSError) as e:  # the other ranks wait for this answer: never leave them without one
            error = str(e) if isinstance(e, ValueError) else f"cannot use the run folder {folder}: {e.strerror or e}"
            if lock is not None:
                lock.release()
    error = broadcast_text(error, info)
    if error:
        raise ValueError(error)
    return lock, folder, resolve_resume(cfg.train.resume, folder)


def end_run(tracker: Tracker, error: BaseException | None = None) -> None:
    """Close the tracker's run: FINISHED, KILLED (a stop signal, Ctrl-C) or FAILED, with the error as a tag.

    A failure to close is reported, not raised: it must not hide the error that ended the run.
    """
    status = FINISHED if error is None else KILLED if interrupted(error) else FAILED
    try:
        tracker.close(status, error_line(error) if error is not None else "")
    except Exception as e:
        if error is None:
            raise
        print(f"dist-coop: could not close the tracker's run as {status}: {e}", file=sys.stderr)


def disk_full_error_line(error: BaseException) -> str:
    """``no space left on device writing <file> (the disk at <mount> ...)`` for a full disk met anywhere."""
    name = next((e.filename for e in error_chain(error) if isinstance(e, OSError) and e.filename), None)
    where = f" writing {name}" if name else ""
    disk = f" ({disk_full_line(name)})" if name else ""
    return f"no space left on device{where}{disk}; free space and run the command again"


def evaluate_checkpoint(path: str | Path, device: str = "auto", split: str = "val") -> str:
    """Every net of a run folder's latest checkpoint (or of a checkpoint folder) at every depth, on its config's
    validation data (``split="val"``) or on its training samples without augmentation (``"train"``: next to
    ``val``, how well the nets fit what they were trained on); returns the results table."""
    run = load_run(path, resolve_device(device, field="--device"))
    cfg = run.config
    data = build_data(cfg.data, seed=cfg.train.seed, device=run.device)
    amp = None if cfg.dist.engine == "deepspeed" else resolve_amp(cfg.optim.amp, run.device)
    autocast = (lambda: torch.autocast(run.device.type, dtype=amp)) if amp is not None else None
    batches = split_batches(data, split)
    metrics, costs = {}, {}
    for spec in run.specs:
        net = run.nets[spec.name]
        for s in spec.eval_depths:
            sums = evaluate_sums(net, batches.epoch(0), s, autocast)
            metrics.update(
                {
                    f"{METRIC_PREFIX[split]}/{key}/{spec.metric(s)}": value
                    for key, value in sums_to_metrics(sums).items()
                }
            )
        costs.update(cost_metrics(spec.metric, net, run.inputs.shape))
    return results_table(run.specs, metrics, costs, split=split)


def write_shards_command(args: argparse.Namespace) -> None:
    from dist_coop.data.shards import write_shards
    from dist_coop.data.sources import SOURCES

    if args.video:
        from dist_coop.data.video import video_folder

        if not args.root:
            raise ValueError("--video needs --root, a folder of class folders of clips")
        source = video_folder(args.root, fps=args.fps, size=args.size)
    else:
        if not args.source:
            raise ValueError("give --source (tiny_imagenet, cifar, folder, bundled) or --video")
        if args.source != "bundled" and not args.root:
            raise ValueError(f"--root is required for --source {args.source}")
        kwargs = {"labels": args.cifar_labels} if args.source == "cifar" else {}
        source = SOURCES[args.source](args.root, **kwargs)
    index = write_shards(
        source,
        args.out,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        workers=args.workers,
        limit=args.limit,
        channels=args.channels,
        on_corrupt=args.on_corrupt,
    )
    for split, info in index["splits"].items():
        notes = [f"{n} converted from {m}" for m, n in info["converted"].items()]
        notes += [f"{len(info['skipped'])} unreadable file(s) skipped"] if info["skipped"] else []
        notes += [f"image sizes {', '.join(info['sizes'])}"] if len(info["sizes"]) > 1 else []
        print(f"{split}: {info['count']} samples in {len(info['shards'])} shard(s)" + "".join(f"; {n}" for n in notes))
    hidden = index.get("hidden_files", 0)
    passed = f"; {hidden} hidden file(s) passed over (names starting with '.', __MACOSX)" if hidden else ""
    print(f"{len(index['classes'])} classes, mode {index['mode']}{passed}; index: {Path(args.out) / 'index.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A user error (ValueError, FileNotFoundError) is one line on stderr and exit code 2
    (a diverged run: exit code 1); ``--debug`` adds the traceback."""
    debug_help = "on an error, print the traceback too (default: one line)"
    parser = argparse.ArgumentParser(prog="dist-coop", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command too; SUPPRESS keeps one given before
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser(
        "train",
        parents=[common],
        help="train the cooperative nets (overrides: --section.key=value)",
        epilog="overrides: --section.key=value for any setting; every setting with its type, default and meaning: "
        "dist-coop config (one section: dist-coop config optim; the values a config gives: dist-coop config --config C)",
    )
    p_train.add_argument(
        "--config", default=None, help="YAML config, e.g. configs/quickstart.yaml (default: built-in defaults)"
    )
    p_eval = sub.add_parser(
        "eval", parents=[common], help="evaluate a checkpoint (folder, or a run directory) at every depth"
    )
    p_eval.add_argument("checkpoint")
    p_eval.add_argument("--device", default="auto")
    p_eval.add_argument(
        "--split",
        default="val",
        choices=EVAL_SPLITS,
        help="val: the validation data; train: the training samples without augmentation (the fit gap)",
    )
    p_shards = sub.add_parser("shards", parents=[common], help="write a dataset as webdataset tar shards + index.json")
    p_shards.add_argument("--source", default="", choices=["", "tiny_imagenet", "cifar", "folder", "bundled"])
    p_shards.add_argument(
        "--video", action="store_true", help="--root holds class folders of video clips: frames become samples (ffmpeg)"
    )
    p_shards.add_argument("--fps", type=float, default=1.0, help="video: frames sampled per second")
    p_shards.add_argument("--size", type=int, default=64, help="video: frames scaled to size x size")
    p_shards.add_argument(
        "--root", default="", help="the dataset folder as distributed (bundled: the IDX folder, default the Debian one)"
    )
    p_shards.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p_shards.add_argument("--max-count", type=int, default=10_000, help="samples per shard (0 = no limit)")
    p_shards.add_argument("--max-bytes", type=int, default=0, help="image bytes per shard (0 = no limit)")
    p_shards.add_argument("--workers", type=int, default=0, help="encoding processes (0 = one per core)")
    p_shards.add_argument("--cifar-labels", default="fine", choices=["fine", "coarse"], help="CIFAR-100 label set")
    p_shards.add_argument(
        "--limit", type=int, default=0, help="only the first N training samples (evaluation splits are written whole)"
    )
    p_shards.add_argument(
        "--channels",
        type=int,
        default=0,
        choices=[0, 1, 3],
        help="store every image as 1 (L) or 3 (RGB) channels, whatever its mode on disk (0 = the dataset's: "
        "Fashion-MNIST 1, everything else 3)",
    )
    p_shards.add_argument(
        "--on-corrupt",
        default="error",
        choices=["error", "skip"],
        help="a file that does not decode: stop naming it (error), or leave it out and list it in index.json (skip)",
    )
    from dist_coop import config_doc, plan, ui
    from dist_coop.infer import commands as infer_commands

    infer_commands.add_parsers(sub, parents=[common])
    ui.add_parser(sub, parents=[common])
    config_doc.add_parser(sub, parents=[common])
    plan.add_parser(sub, parents=[common])
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "train":
            run_training(load_config(args.config, rest))
        elif args.command in infer_commands.COMMANDS:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            infer_commands.COMMANDS[args.command](args)
        elif args.command == "config":
            return config_doc.config_command(args, rest)
        elif args.command == "plan":
            return plan.plan_command(args, rest)
        elif args.command == "ui":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            return ui.ui_command(args)
        elif args.command == "shards":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            write_shards_command(args)
        else:
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            print(evaluate_checkpoint(args.checkpoint, args.device, args.split))
    except (ValueError, FileNotFoundError, NonFiniteError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"dist-coop: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteError) else 2
    except (DiskFullError, TrackingError) as e:  # a full disk, an MLflow store that failed: one line naming it
        if args.debug:
            traceback.print_exc()
        print(f"dist-coop: error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        print(f"dist-coop: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("dist-coop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a full disk, or a peer gone or stalled past dist.timeout_s: one line too
        if is_disk_full(e) and not args.debug:
            print(f"dist-coop: error: {disk_full_error_line(e)}", file=sys.stderr)
            return 1
        line = peer_failure(e, int(os.environ.get("RANK", "0")))
        if line is None or args.debug:
            raise
        print(f"dist-coop: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
