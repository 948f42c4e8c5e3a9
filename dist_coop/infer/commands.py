"""``dist-coop profile | export | stream``: deploy a trained net, read from its run folder by ``load_run`` (no
trainer, optimizer or dataset is built)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dist_coop.infer.budget import choose_depth
from dist_coop.infer.controller import AdaptiveRunner, DepthController
from dist_coop.infer.export import DEFAULT_FORMAT, FORMATS, LEGACY_FORMATS, SUFFIXES, check_out_path, export
from dist_coop.infer.profile import Profile, profile_net
from dist_coop.run import Run, depth_accuracy, load_run, profile_path, require_device


def add_parsers(sub, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """``profile``, ``export`` and ``stream``; ``parents`` hold the options every command shares."""
    parents = parents or []
    p = sub.add_parser(
        "profile",
        parents=parents,
        help="per-depth FLOPs, params, latency and accuracy of a trained net; budget -> depth",
    )
    p.add_argument("run", help="a run directory or checkpoint folder")
    p.add_argument("--net", default="teammate_a")
    p.add_argument("--batch", type=int, default=64, help="the second batch size timed (batch 1 always is)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-gflops", type=float)
    p.add_argument("--max-latency-ms", type=float)
    p.add_argument("--max-params", type=int)
    p.add_argument("--budget-batch", type=int, default=1, help="batch size the latency budget refers to")
    e = sub.add_parser(
        "export", parents=parents, help="a static sub-net at one depth: pt2 (torch.export), onnx, state_dict"
    )
    e.add_argument("run")
    e.add_argument("--net", default="teammate_a")
    e.add_argument("--depth", type=float, required=True)
    e.add_argument(
        "--format",
        choices=FORMATS,
        default=DEFAULT_FORMAT,
        help=f"pt2: torch.export program, load with torch.export.load (default: {DEFAULT_FORMAT}); onnx: the "
        "torch.export-based exporter, dynamic batch; state_dict: weights + blocks per stage; torchscript: "
        "legacy, torch.jit is deprecated in torch",
    )
    e.add_argument("--out", required=True)
    s = sub.add_parser(
        "stream", parents=parents, help="classify a video's frames, the controller holding a latency target"
    )
    s.add_argument("video")
    s.add_argument("--run", required=True, help="a run directory or checkpoint folder")
    s.add_argument("--net", default="teammate_a")
    s.add_argument("--target-ms", type=float, required=True)
    s.add_argument("--fps", type=float, default=0.0, help="resample the clip to this rate (0 = its own)")
    s.add_argument("--no-pace", action="store_true", help="process frames as fast as possible, not at the clip's rate")
    s.add_argument("--plot", default="", help="write latency and depth over time to this PNG")
    s.add_argument("--quiet", action="store_true", help="only the summary")
    s.add_argument("--device", default="cpu")
    s.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: batch-1 calls gain little from more, and suffer most under load)",
    )


def profile_command(args: argparse.Namespace) -> Profile:
    run = load_run(args.run, require_device(args.device, "--device"), nets=[args.net])
    profile = profile_net(
        run.nets[args.net],
        run.inputs.shape,
        batch_sizes=sorted({1, args.batch}),
        accuracy=depth_accuracy(run.folder, args.net),
        repeats=args.repeats,
    )
    path = profile.save(profile_path(run.folder, args.net))
    print(profile.table())
    print(f"profile written to {path}")
    if args.max_gflops is not None or args.max_latency_ms is not None or args.max_params is not None:
        d = choose_depth(
            profile,
            max_gflops=args.max_gflops,
            max_latency_ms=args.max_latency_ms,
            max_params=args.max_params,
            batch_size=args.budget_batch,
        )
        print(
            f"budget -> depth {d.s} ({d.blocks} blocks, {d.gflops:.4f} GFLOPs, {d.latency_ms.get(args.budget_batch, float('nan')):.3f} ms, top-1 {d.accuracy})"
        )
    _log_to_mlflow(run, profile, args.net, path)
    return profile


def _log_to_mlflow(run: Run, profile: Profile, net: str, path: Path) -> None:
    """Add the profile to the run's MLflow run when it was tracked, leaving the run's status as it was (a RUNNING
    run whose trainer is gone becomes KILLED: ``add_to_run``). The store is found as ``dist-coop ui`` finds it:
    ``tracking.uri``, else the ``mlflow.db`` beside the run folder (its ``train.out_dir``, wherever training
    was started)."""
    cfg = run.config
    if cfg.tracking.backend != "mlflow" or not run.mlflow_run_id:
        return
    from dist_coop.track.mlflow_tracker import add_to_run, default_uri

    uri = cfg.tracking.uri or default_uri(run.folder.resolve().parent)
    metrics = {f"profile/latency_ms_b{b}/{net}@{d.s}": ms for d in profile.depths for b, ms in d.latency_ms.items()}
    found, status = add_to_run(
        uri, run.mlflow_run_id, step=run.step, metrics=metrics, artifacts=[path], by="dist-coop profile"
    )
    if status != found:
        print(f"MLflow run {run.mlflow_run_id} was {found} but its trainer is gone: marked {status} (tags attempt/*)")


def export_command(args: argparse.Namespace) -> Path:
    check_out_path(args.out, "--out", f"{args.net}_{args.depth:g}.{SUFFIXES[args.format]}")  # before loading nets
    if args.format in LEGACY_FORMATS:
        print(
            f"dist-coop: note: {args.format} is legacy (torch.jit is deprecated in torch {torch.__version__}); "
            "prefer --format pt2 or onnx",
            file=sys.stderr,
        )
    run = load_run(args.run, "cpu", nets=[args.net])
    path = export(run.nets[args.net], args.depth, args.out, args.format, run.inputs.shape)
    print(f"depth {args.depth} of {args.net} written as {args.format} to {path}")
    return path


def stream_command(args: argparse.Namespace) -> str:
    from dist_coop.data.video import ffmpeg_frames
    from dist_coop.infer.profile import measure_latency
    from dist_coop.infer.stream import clip_fps, plot_stream, run_stream, summarize

    fps = args.fps or clip_fps(args.video)  # a missing, unreadable or audio-only file fails here, before the nets load
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.run, require_device(args.device, "--device"), nets=[args.net])
    net = run.nets[args.net]
    c, h, w = run.inputs.shape
    x = torch.zeros(1, c, h, w, device=run.device)
    base = {}
    for s in net.scaling_factors:
        with net.at_depth(s):
            base[s] = measure_latency(net, x, repeats=20, warmup=3)
    runner = AdaptiveRunner(net, DepthController(base, args.target_ms))
    results = run_stream(
        runner,
        ffmpeg_frames(args.video, height=h, width=w, channels=c, fps=args.fps or None),
        mean=run.inputs.mean,
        std=run.inputs.std,
        classes=run.inputs.classes,
        fps=fps,
        pace=not args.no_pace,
        device=run.device,
        printer=None if args.quiet else print,
    )
    summary = summarize(results, args.target_ms)
    print(summary)
    if args.plot:
        print(f"plot: {plot_stream(results, args.target_ms, args.plot)}")
    return summary


COMMANDS = {"profile": profile_command, "export": export_command, "stream": stream_command}
