"""Forward GFLOPs per image of the paper-scale recipes' backbones at every depth, and their training work.

    python benchmarks/recipe_costs.py [--configs configs/paper] [--markdown]

For every ``*_ctf.yaml`` in ``--configs`` the net is built from the config's model section
(``dist_coop.models.registry``) and one forward per depth is counted on a (1, 3, H, W) zero image on
CPU by the project's cost function ``dist_coop.infer.cost.depth_costs`` (``FlopCounterMode``; a
multiply-add counts 2). Nothing is trained; a few seconds on CPU.

Columns 0.25 / 0.5 / 0.75 / 1.0 are the four standard scaling factors. A factor whose depth mask
equals another's on this backbone is not a separate depth (config validation refuses the pair); it
is shown as ``= s'`` (ResNet-18: 2 blocks per stage, so 0.25 = 0.5 and 0.75 = 1.0).

Training work, in petaFLOPs (1e15) for the whole schedule: every net of the task runs one forward per
trained depth per image (``NetSpec.trained_depths``: the Leader its full depth, each Teammate every
depth, each independent net its own depth), backward counted as twice the forward (3x in all; the
quick start measures 3.00x for a plain step and 6.12x cooperative/plain with ``benchmarks/step_cost.py``,
as this rule predicts), times training images times epochs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_coop.config import Config, load_config
from dist_coop.coop.task import build_task
from dist_coop.infer.cost import DepthCost, depth_costs
from dist_coop.models.masks import active_blocks
from dist_coop.models.registry import build_from_config

STANDARD_FACTORS = (0.25, 0.5, 0.75, 1.0)
# config name prefix -> (input side in pixels, training images): CIFAR-100 train 50k at 32x32,
# Tiny ImageNet train 100k at 64x64 (its val 10k evaluates)
DATASETS: dict[str, tuple[int, int]] = {"cifar100": (32, 50_000), "tinyimagenet": (64, 100_000)}


@dataclass(frozen=True)
class RecipeCost:
    name: str  # the config stem without _ctf
    backbone: str
    side: int
    params: int  # parameters of the full net
    columns: tuple[str, ...]  # GFLOPs per image at STANDARD_FACTORS, or "= s'"
    blocks: tuple[str, ...]  # residual blocks that run at STANDARD_FACTORS
    train_pflops: dict[str, float]  # task -> petaFLOPs of the whole schedule


def dataset_of(stem: str) -> tuple[int, int]:
    for prefix, spec in DATASETS.items():
        if stem.startswith(prefix):
            return spec
    raise ValueError(f"{stem}: unknown dataset prefix; known: {sorted(DATASETS)}")


def training_pflops(cfg: Config, side: int, images: int, cache: dict[bool, dict[float, DepthCost]]) -> float:
    """Forward + backward (3x forward) FLOPs of every trained net-depth, over the whole schedule, / 1e15."""
    per_image = 0.0
    for spec in build_task(cfg.coop).specs:
        if spec.leader not in cache:
            net = spec.build(cfg.model, cfg.coop.scaling_factors)
            cache[spec.leader] = depth_costs(net, (cfg.model.in_channels, side, side))
        per_image += sum(cache[spec.leader][s].gflops for s in spec.trained_depths) * 1e9
    return 3 * per_image * images * cfg.train.epochs / 1e15


def recipe_cost(ctf_path: Path) -> RecipeCost:
    stem = ctf_path.stem.removesuffix("_ctf")
    side, images = dataset_of(stem)
    cfg = load_config(ctf_path, ["--tracking.backend=none"])
    torch.manual_seed(0)
    net = build_from_config(cfg.model, cfg.coop.scaling_factors)
    costs = depth_costs(net, (cfg.model.in_channels, side, side))
    stage_sizes = [len(stage) for stage in net.masks[1.0]]
    columns, blocks = [], []
    for s in STANDARD_FACTORS:
        mask = active_blocks(stage_sizes, s, cfg.model.keep)
        same = next(f for f in sorted(costs) if net.masks[f] == mask)  # every mask has a trained representative
        columns.append(f"{costs[same].gflops:.4f}" if same == s else f"= {same:g}")
        blocks.append(str(costs[same].blocks))
    cache = {False: costs}
    work = {"ctf": training_pflops(cfg, side, images, cache)}
    twin = ctf_path.with_name(f"{stem}_independent.yaml")
    if twin.is_file():
        work["independent"] = training_pflops(load_config(twin, ["--tracking.backend=none"]), side, images, {})
    return RecipeCost(stem, cfg.model.name, side, costs[1.0].params, tuple(columns), tuple(blocks), work)


def table(rows: list[RecipeCost], markdown: bool) -> str:
    head = ["recipe", "backbone", "input", "params", *(f"GFLOPs@{s:g}" for s in STANDARD_FACTORS)]
    head += ["blocks@0.25/0.5/0.75/1", "train PFLOPs ctf", "train PFLOPs indep."]
    body = [
        [
            r.name,
            r.backbone,
            f"{r.side}x{r.side}",
            f"{r.params / 1e6:.2f}M",
            *r.columns,
            "/".join(r.blocks),
            f"{r.train_pflops['ctf']:,.0f}",
            f"{r.train_pflops['independent']:,.0f}" if "independent" in r.train_pflops else "-",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="configs/paper", help="folder of *_ctf.yaml (+ *_independent.yaml)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    paths = sorted(Path(args.configs).glob("*_ctf.yaml"))
    if not paths:
        raise SystemExit(f"no *_ctf.yaml in {args.configs}")
    torch.set_num_threads(1)
    rows = sorted((recipe_cost(p) for p in paths), key=lambda r: (r.name.split("_")[0], r.params))
    print(table(rows, args.markdown))
    print(f"forward FLOPs per image at batch 1 (FlopCounterMode), torch {torch.__version__}, CPU")


if __name__ == "__main__":
    main()
