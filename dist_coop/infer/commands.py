"""``dist-coop profile | budget | export | stream``: deploy a trained net, read from its run folder by ``load_run`` (no
trainer, optimizer or dataset is built)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dist_coop.distributed.env import resolve_device
from dist_coop.infer.budget import choice_line, choose_depth, latency_warning
from dist_coop.infer.controller import AdaptiveRunner, DepthController
from dist_coop.infer.export import (
    DEFAULT_FORMAT,
    FORMATS,
    GRAPH_FORMATS,
    LEGACY_FORMATS,
    SUFFIXES,
    check_normalize,
    check_out_path,
    export,
)
from dist_coop.infer.profile import RUNTIMES, Profile, profile_net
from dist_coop.run import Run, depth_accuracy, load_run, profile_path


def add_parsers(sub, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """``profile``, ``budget``, ``export`` and ``stream``; ``parents`` hold the options every command shares."""
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
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="eager",
        help="what runs the timed forwards, as it will serve: eager (the adaptive net in PyTorch), pt2 (each depth's "
        "torch.export program), onnxruntime (each depth's ONNX export, CPU provider)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of the runtime (torch or onnxruntime)")
    _budget_arguments(p, "--budget-batch")
    b = sub.add_parser(
        "budget",
        parents=parents,
        help="the most accurate depth within a budget, from the profile dist-coop profile saved",
    )
    b.add_argument("profile", help="a run directory (its profile_<net>.json) or a profile JSON file")
    b.add_argument("--net", default="teammate_a")
    _budget_arguments(b, "--batch")
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
    e.add_argument(
        "--normalize-in-graph",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="put (x - mean) / std first in the graph, so pixels / 255 in [0, 1] go straight in (the default for "
        f"{', '.join(GRAPH_FORMATS)}); --no-normalize-in-graph: the graph takes standardised input, as the nets did "
        "in training (state_dict always)",
    )
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


def _budget_arguments(p: argparse.ArgumentParser, batch_flag: str) -> None:
    p.add_argument("--max-gflops", type=float)
    p.add_argument("--max-latency-ms", type=float)
    p.add_argument("--max-params", type=int)
    p.add_argument(batch_flag, type=int, default=1, help="batch size the latency budget refers to")


def _has_budget(args: argparse.Namespace) -> bool:
    return args.max_gflops is not None or args.max_latency_ms is not None or args.max_params is not None


def _print_budget(profile: Profile, args: argparse.Namespace, batch_size: int) -> None:
    d = choose_depth(
        profile,
        max_gflops=args.max_gflops,
        max_latency_ms=args.max_latency_ms,
        max_params=args.max_params,
        batch_size=batch_size,
    )
    print(choice_line(profile, d, batch_size))


def _warn_latency(profile: Profile) -> None:
    warning = latency_warning(profile)
    if warning:
        print(f"dist-coop: warning: {warning}", file=sys.stderr)


def profile_command(args: argparse.Namespace) -> Profile:
    run = load_run(args.run, resolve_device(args.device, field="--device"), nets=[args.net])
    profile = profile_net(
        run.nets[args.net],
        run.inputs.shape,
        batch_sizes=sorted({1, args.batch}),
        accuracy=depth_accuracy(run.folder, args.net),
        repeats=args.repeats,
        runtime=args.runtime,
        threads=args.threads,
    )
    path = profile.save(profile_path(run.folder, args.net))
    print(profile.table())
    print(f"profile written to {path}")
    _warn_latency(profile)
    if _has_budget(args):
        _print_budget(profile, args, args.budget_batch)
    _log_to_mlflow(run, profile, args.net, path)
    return profile


def budget_command(args: argparse.Namespace) -> Profile:
    """The budget applied to a saved profile: a profile JSON, or the run folder's ``profile_<net>.json``."""
    if not _has_budget(args):
        raise ValueError("give a budget: --max-gflops, --max-latency-ms and/or --max-params")
    path = Path(args.profile)
    if path.is_dir():
        path = profile_path(path, args.net)
        if not path.is_file():
            raise FileNotFoundError(f"no profile of {args.net} in {args.profile}: run dist-coop profile {args.profile}")
    elif not path.is_file():
        raise FileNotFoundError(f"profile not found: {path}")
    try:
        profile = Profile.from_json(path.read_text())
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a profile written by dist-coop profile ({type(e).__name__}: {e})") from None
    _warn_latency(profile)
    _print_budget(profile, args, args.batch)
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
    normalize = args.normalize_in_graph if args.normalize_in_graph is not None else args.format in GRAPH_FORMATS
    check_normalize(args.format, normalize)
    run = load_run(args.run, "cpu", nets=[args.net])
    inputs = run.inputs
    path = export(
        run.nets[args.net],
        args.depth,
        args.out,
        args.format,
        inputs.shape,
        inputs=inputs,
        normalize_in_graph=normalize,
        name=args.net,
    )
    print(f"depth {args.depth} of {args.net} written as {args.format} to {path}")
    what = "pixels / 255 in [0, 1], normalised in the graph" if normalize else "(pixels / 255 - mean) / std"
    print(
        f"input: float32 (N, {', '.join(map(str, inputs.shape))}), {what}; mean {list(inputs.mean)}, std "
        f"{list(inputs.std)}; {len(inputs.classes)} classes (in the file's metadata)"
    )
    return path


def stream_command(args: argparse.Namespace) -> str:
    from dist_coop.data.video import ffmpeg_frames
    from dist_coop.infer.profile import measure_latency
    from dist_coop.infer.stream import clip_fps, plot_stream, run_stream, summarize

    fps = args.fps or clip_fps(args.video)  # a missing, unreadable or audio-only file fails here, before the nets load
    if args.threads:
        torch.set_num_threads(args.threads)
    run = load_run(args.run, resolve_device(args.device, field="--device"), nets=[args.net])
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


COMMANDS = {
    "profile": profile_command,
    "budget": budget_command,
    "export": export_command,
    "stream": stream_command,
}
