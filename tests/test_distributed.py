"""Real multi-process runs on CPU (gloo): split and colocated placements, torch and DeepSpeed engines."""

import pytest
import torch

from dist_coop.distributed.env import DistInfo
from dist_coop.distributed.placement import check_engine_support, plan_placement
from tests.dist_helpers import run_steps, spawn, spawn_jobs
from tests.helpers import RANKS, tiny_config

NETS = ("leader", "teammate_a", "teammate_b")


def test_placement_plans():
    p = plan_placement("split", 6, NETS)
    assert p.group_size == 2
    assert [p.nets_of(r) for r in range(6)] == [
        ("leader",),
        ("leader",),
        ("teammate_a",),
        ("teammate_a",),
        ("teammate_b",),
        ("teammate_b",),
    ]
    assert p.net_ranks("teammate_a") == (2, 3)
    assert p.exchange_ranks(1) == (1, 3, 5) and p.exchange_index(5) == 1
    assert plan_placement("auto", 3, NETS).kind == "split"
    assert plan_placement("auto", 2, NETS).kind == "colocated"
    assert plan_placement("auto", 1, NETS).kind == "colocated"
    c = plan_placement("colocated", 4, NETS)
    assert c.nets_of(3) == NETS and c.num_shards == 4 and c.exchange_index(3) == 3
    with pytest.raises(ValueError, match="split needs a world size that is a multiple of the 3 nets"):
        plan_placement("split", 4, NETS)
    with pytest.raises(ValueError, match="dist.placement must be one of"):
        plan_placement("ring", 3, NETS)
    with pytest.raises(ValueError, match="zero_stage 3 with placement split is not supported"):
        check_engine_support(plan_placement("split", 3, NETS), "deepspeed", 3)
    check_engine_support(plan_placement("colocated", 2, NETS), "deepspeed", 3)
    check_engine_support(plan_placement("split", 3, NETS), "deepspeed", 2)


def _reference(tmp_path, num_steps, *overrides):
    """The same config in one process (colocated)."""
    return run_steps(
        tiny_config(tmp_path / "ref", *RANKS, "--dist.placement=colocated", *overrides), DistInfo(), num_steps
    )


def _assert_same_losses(got, ref, rel=1e-4):
    for step, (a, b) in enumerate(zip(got, ref)):
        for k, v in a.items():
            assert v == pytest.approx(b[k], rel=rel), (step, k)


SPLIT_CASES = [("torch", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2)]


def _split_overrides(engine: str, zero: int) -> list[str]:
    """Gradient clipping is off under ZeRO-1/2: DeepSpeed's clipping is its own code and moves parameters by
    up to 1e-3 from torch's ``clip_grad_norm_`` after three steps (measured); everything else matches.
    Under fp32 ZeRO-0 the engine clips as the torch engine does, and clipping stays on."""
    return ["--optim.grad_clip=0"] if engine == "deepspeed" and zero > 0 else []


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, fmnist_root):
    """Every engine and ZeRO stage of the split placement on 3 ranks: one run of three processes."""
    jobs = {
        f"{engine}-{zero}": [
            "--dist.placement=split",
            f"--dist.engine={engine}",
            f"--dist.zero_stage={zero}",
            *_split_overrides(engine, zero),
        ]
        for engine, zero in SPLIT_CASES
    }
    return spawn_jobs(3, jobs, tmp_path_factory.mktemp("three_ranks"), num_steps=3)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, fmnist_root):
    """The colocated placement on 2 ranks: torch engine, DeepSpeed ZeRO-2 and ZeRO-3 (one run of two processes)."""
    jobs = {
        "torch": ["--dist.placement=colocated"],
        **{
            f"zero{z}": ["--dist.placement=colocated", "--dist.engine=deepspeed", f"--dist.zero_stage={z}"]
            for z in (2, 3)
        },
    }
    return spawn_jobs(2, jobs, tmp_path_factory.mktemp("two_ranks"), num_steps=3)


@pytest.mark.slow
@pytest.mark.parametrize("engine, zero", SPLIT_CASES)
def test_split_three_ranks_equals_one_process(tmp_path, three_ranks, engine, zero):
    """Leader, Teammate A, Teammate B on three ranks: every loss at every step equals the one-process run."""
    overrides = _split_overrides(engine, zero)
    ranks = three_ranks[f"{engine}-{zero}"]
    ref = _reference(tmp_path, 3, *overrides)
    assert [r["nets"] for r in ranks] == [["leader"], ["teammate_a"], ["teammate_b"]]
    for r in ranks:
        assert r["placement"] == "split"
        _assert_same_losses(r["losses"], ref["losses"])
        assert r["labels"] == ref["labels"] and r["pixels"] == ref["pixels"]  # the exchange group saw the same samples
    for r, name in zip(ranks, NETS):
        torch.testing.assert_close(r["params"][name], ref["params"][name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_split_six_ranks_two_per_net(tmp_path, fmnist_root, two_ranks):
    """D = 2: replicas of a net stay identical, exchange groups share samples, shards differ; equals colocated on 2 ranks."""
    ranks = spawn(6, tmp_path / "split", ["--dist.placement=split"], num_steps=3)
    for g in range(2):  # exchange group g = ranks g, g + 2, g + 4
        members = [ranks[g], ranks[g + 2], ranks[g + 4]]
        assert all(m["labels"] == members[0]["labels"] and m["pixels"] == members[0]["pixels"] for m in members)
    assert ranks[0]["labels"] != ranks[1]["labels"]  # the two exchange groups read different shards
    for i, name in enumerate(NETS):
        torch.testing.assert_close(ranks[2 * i]["params"][name], ranks[2 * i + 1]["params"][name], rtol=0, atol=0)
    colocated = two_ranks["torch"]
    for name in NETS:  # the same data-parallel computation, placed differently
        torch.testing.assert_close(
            colocated[0]["params"][name], ranks[2 * NETS.index(name)]["params"][name], rtol=1e-4, atol=1e-5
        )
    for g in range(2):
        assert colocated[g]["labels"] == ranks[g]["labels"]
        for step in range(3):
            for name in NETS:
                key = f"train/loss/{name}"
                assert colocated[g]["losses"][step][key] == pytest.approx(
                    ranks[g + 2 * NETS.index(name)]["losses"][step][key], rel=1e-4
                )


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_colocated_two_ranks_keeps_replicas_equal(two_ranks, zero):
    ranks = two_ranks[f"zero{zero}"]
    assert ranks[0]["nets"] == sorted(NETS) and ranks[0]["labels"] != ranks[1]["labels"]
    for name in NETS:
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], rtol=0, atol=0)


@pytest.mark.slow
def test_deepspeed_zero0_clips_as_the_torch_engine(tmp_path, fmnist_root):
    """fp32 ZeRO-0 in one process, clipping on every step (a low threshold): the DeepSpeed engine clips the
    gradients itself (DeepSpeed's clipping off, no all-reduce in a group of one) and takes the torch
    engine's steps; its clip coefficient is logged as the torch engine's is."""
    clip = ["--optim.grad_clip=0.05", "--optim.clip_scale=none"]
    (ds,) = spawn(1, tmp_path / "ds", ["--dist.engine=deepspeed", "--dist.zero_stage=0", *clip], num_steps=3)
    ref = _reference(tmp_path, 3, *clip)
    _assert_same_losses(ds["losses"], ref["losses"])
    for name in NETS:
        torch.testing.assert_close(ds["params"][name], ref["params"][name], rtol=1e-4, atol=1e-5)
    for got, want in zip(ds["clip"], ref["clip"]):
        assert got == pytest.approx(want, rel=1e-4)
    assert all(0 < v < 1 for step in ds["clip"] for v in step.values())  # clipping acted on every step
