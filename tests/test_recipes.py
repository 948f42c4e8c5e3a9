"""Shipped configs: every training config loads; the paper-scale recipes (configs/paper/) carry the
issue's numbers, pair each cooperative config with its independent-net baseline, build their nets,
and their header launch commands keep a global batch of 128 per net."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_coop.config import SECTIONS, Config, load_config
from dist_coop.models.registry import build_from_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER = CONFIGS / "paper"
NOT_TRAINING = {"experiments/configs/ladder.yaml"}  # the ablation sweep spec, read by experiments/ablation.py

PAPER_MODELS = {
    "cifar100_resnet56": "resnet56",
    "cifar100_resnet110": "resnet110",
    "tinyimagenet_resnet18": "resnet18_64",
    "tinyimagenet_resnet34": "resnet34_64",
}
# keys whose defaults are being re-chosen: the recipes must inherit them from the code
INHERITED = {"coop": ("temperature", "kd_warmup"), "optim": ("grad_clip",)}


def _raw(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _is_training_config(path: Path) -> bool:
    """A training config's top level is config sections; a sweep spec (or anything else) has none of them."""
    if path.relative_to(ROOT).as_posix() in NOT_TRAINING:
        return False
    raw = _raw(path)
    return isinstance(raw, dict) and any(key in SECTIONS for key in raw)


ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
PAPER_YAML = sorted(PAPER.glob("*.yaml"))
CTF_YAML = [p for p in PAPER_YAML if p.stem.endswith("_ctf")]


def _id(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


@cache
def _load(path: Path) -> Config:
    return load_config(path)


@pytest.mark.parametrize("path", ALL_YAML, ids=_id)
def test_every_training_config_loads(path: Path) -> None:
    if not _is_training_config(path):
        pytest.skip("not a training config (no config sections at its top level)")
    cfg = load_config(path)
    assert cfg.train.run_name == path.stem


def test_the_eight_paper_configs_exist() -> None:
    expected = {f"{stem}_{task}.yaml" for stem in PAPER_MODELS for task in ("ctf", "independent")}
    assert {p.name for p in PAPER_YAML} == expected


@pytest.mark.parametrize("path", PAPER_YAML, ids=_id)
def test_paper_config_has_the_issue_numbers(path: Path) -> None:
    cfg = _load(path)
    stem = path.stem.rsplit("_", 1)[0]
    assert cfg.model.name == PAPER_MODELS[stem]
    assert (cfg.model.in_channels, cfg.model.width) == (3, 0)
    assert cfg.data.shards, "paper recipes read shards written by dist-coop shards"
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert o.schedule in ("step", "cosine") and 100 <= o.warmup_steps <= 1000
    assert o.amp == "bf16"
    if stem.startswith("cifar100"):
        assert cfg.model.num_classes == 100
        assert (cfg.data.batch_size, cfg.train.epochs) == (128, 200)
    else:
        assert cfg.model.num_classes == 200 and cfg.data.image_size == 64
        assert 128 <= cfg.data.batch_size <= 256 and 100 <= cfg.train.epochs <= 200
    assert cfg.coop.task == ("independent" if path.stem.endswith("_independent") else "cooperative")


@pytest.mark.parametrize("path", PAPER_YAML, ids=_id)
def test_paper_config_inherits_the_recipe_defaults_under_review(path: Path) -> None:
    raw = _raw(path)
    for section, keys in INHERITED.items():
        for key in keys:
            assert key not in (raw.get(section) or {}), f"{section}.{key} must come from the code defaults"
    gate_keys = [k for k in raw.get("model") or {} if k.startswith("gate")]
    assert not gate_keys, f"gate options must come from the code defaults, found {gate_keys}"


@pytest.mark.parametrize("ctf", CTF_YAML, ids=_id)
def test_each_ctf_config_has_a_matching_independent_baseline(ctf: Path) -> None:
    twin = ctf.with_name(ctf.name.replace("_ctf", "_independent"))
    assert twin.is_file(), f"{ctf.name} has no baseline {twin.name}"
    a, b = _load(ctf), _load(twin)
    assert a.model == b.model and a.data == b.data and a.optim == b.optim
    assert a.train.epochs == b.train.epochs
    assert a.coop.scaling_factors == b.coop.scaling_factors


@pytest.mark.parametrize("path", CTF_YAML, ids=_id)
def test_paper_nets_build_with_distinct_depths(path: Path) -> None:
    cfg = _load(path)  # the independent twin has the same model and factors (test above)
    net = build_from_config(cfg.model, cfg.coop.scaling_factors)  # refuses factors that share a depth mask
    assert sorted(net.masks) == sorted(cfg.coop.scaling_factors)


def _commands(path: Path) -> str:
    """The header comment, continuation lines joined."""
    header = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return re.sub(r"\\\s+", " ", "\n".join(header))


@pytest.mark.parametrize("path", PAPER_YAML, ids=_id)
def test_header_commands_keep_a_global_batch_per_net(path: Path) -> None:
    """world = nets x D ranks (split); data.batch_size is per rank, so batch x D must be the config's batch."""
    cfg = _load(path)
    nets = len(cfg.coop.scaling_factors) if cfg.coop.task == "independent" else 3
    text = _commands(path)
    launches = {
        "deepspeed": r"deepspeed --num_gpus (\d+) (.*)",
        "torchrun": r"torchrun --nnodes 2 --nproc_per_node (\d+) (.*)",
    }
    for launcher, pattern in launches.items():
        m = re.search(pattern, text)
        assert m, f"{path.name}: no {launcher} command in the header"
        world = int(m.group(1)) * (2 if launcher == "torchrun" else 1)
        rest = m.group(2)
        assert f"--config configs/paper/{path.name}" in rest
        assert "--dist.placement=split" in rest and world % nets == 0
        batch = int(re.search(r"--data\.batch_size=(\d+)", rest).group(1))
        assert batch * (world // nets) == cfg.data.batch_size, f"{launcher}: {batch} x {world // nets} ranks per net"
    assert "dist-coop shards --source" in text


def test_recipes_doc_names_every_paper_config() -> None:
    doc = (ROOT / "docs" / "results" / "8k" / "recipes.md").read_text()
    assert doc.startswith("## Paper-scale recipes")
    for path in PAPER_YAML:
        assert path.name in doc
    assert "has been run here" in doc
