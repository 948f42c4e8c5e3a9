"""A net's loss backpropagated part by part (CooperativeTask.backward_local): the gradients of the summed loss."""

import os

import pytest
import torch

from dist_coop.config import CoopConfig, load_config
from dist_coop.coop import CooperativeTask
from dist_coop.coop.forward import DepthForward
from dist_coop.distributed.engine import TorchEngine
from dist_coop.models import build_model
from dist_coop.ports import free_port
from tests.dist_helpers import start_workers

FACTORS = (0.25, 0.5, 0.75, 1.0)
NAMES = ("leader", "teammate_a", "teammate_b")
SOLO = dict(teammates=1, leader=False, beta=0.0)  # one Teammate: self-learning only


def _nets(dtype=torch.float64, names=NAMES, share=True):
    torch.manual_seed(0)
    return {
        n: build_model("resnet32", FACTORS, width=2, in_channels=1, num_classes=5, share_prefix=share).to(dtype)
        for n in names
    }


def _summed(task, nets, x, y, scale=1.0):
    """The reference: every net's terms summed, one backward per net."""
    terms = task(nets, x, y)
    for name in nets:
        (scale * sum(v for k, v in terms.items() if k.startswith(name + "/"))).backward()
    return terms


def _batch(seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (6,), generator=g)


CONFIGS = {
    "ctf": {},
    "ctf_kd_norm_leader_kd": dict(kd_norm=True, leader_kd=0.5),
    "ctf_sub_guided_gate_reg_kd_mask": dict(sub_guided=True, gate_reg=0.1, kd_mask="correct"),
    "ctf_no_sub_ce": dict(sub_ce=False, alpha=0.0),
    "solo": SOLO,
}


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_part_by_part_equals_summed_backward(config, share):
    cfg = CoopConfig(scaling_factors=FACTORS, kd_warmup=0.0, peer_warmup=0.0, **CONFIGS[config])
    task = CooperativeTask(cfg)
    names = [s.name for s in task.specs]
    reference, parts = _nets(names=names, share=share), _nets(names=names, share=share)
    x, y = _batch()
    terms = _summed(task, reference, x, y)
    calls = []

    def backward(name, loss, last):
        calls.append((name, last))
        loss.backward()

    values = task.backward_local(parts, x, y, dict, backward)
    assert values.keys() == terms.keys()
    for key, value in terms.items():
        assert torch.equal(values[key], value.detach()), key
    for name in names:
        for (pname, a), b in zip(reference[name].named_parameters(), parts[name].parameters()):
            assert (a.grad is None) == (b.grad is None), (name, pname)
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-13, msg=f"{name} {pname}")
        for a, b in zip(reference[name].buffers(), parts[name].buffers()):
            assert torch.equal(a, b)
        own = [last for n, last in calls if n == name]
        assert own[-1] and not any(own[:-1]), (name, own)  # one last call, the final one
        # a Teammate's parts: full depth, each sub-net, and (shared prefix) the shared part
        expected = 1 + len(task.sub_depths(name)) + int(share and len(task.depths(name)) > 1)
        assert len(own) == expected, (name, own)


def test_ready_nets_go_first_and_the_exchange_runs_once():
    """Colocated: the Leader (it reads no soft target) backpropagates before the Teammates' forwards."""
    task = CooperativeTask(CoopConfig(scaling_factors=FACTORS))
    nets, order, exchanged = _nets(), [], []
    for name, net in nets.items():
        net.backbone.conv1.register_forward_hook(lambda m, a, o, name=name: order.append(("forward", name)))

    def exchange(local):
        exchanged.append(sorted(local))
        return dict(local)

    x, y = _batch()
    task.backward_local(
        nets, x, y, exchange, lambda name, loss, last: (order.append(("backward", name)), loss.backward())
    )
    assert order[:3] == [("forward", "leader"), ("backward", "leader"), ("forward", "teammate_a")]
    assert exchanged == [sorted(NAMES)]


def test_loss_scale_of_the_backward_is_read_not_assumed():
    """A backward that scales each loss (GradScaler, DeepSpeed fp16) gives scaled gradients through the shared part."""
    task = CooperativeTask(CoopConfig(scaling_factors=FACTORS, **SOLO))
    reference, parts = _nets(names=["teammate_a"]), _nets(names=["teammate_a"])
    x, y = _batch()
    _summed(task, reference, x, y, scale=1024.0)
    task.backward_local(parts, x, y, dict, lambda name, loss, last: (1024.0 * loss).backward())
    for a, b in zip(reference["teammate_a"].parameters(), parts["teammate_a"].parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-10)


def test_depth_forward_without_sharing_runs_each_depth_alone():
    net = _nets(names=["a"], share=False)["a"]
    x, _ = _batch()
    fw = DepthForward(net, x, FACTORS, detach=True)
    assert not fw.shared and not fw.detach and fw.scaled(x.sum()) is not None
    with net.at_depth(0.5):
        assert torch.equal(fw(0.5), net(x))


def test_torch_engine_accumulates_parts():
    cfg = load_config(None, ["--optim.grad_clip=0", "--optim.momentum=0", "--optim.weight_decay=0"]).optim
    task = CooperativeTask(CoopConfig(scaling_factors=FACTORS, kd_warmup=0.0, peer_warmup=0.0))
    nets = [_nets(torch.float32), _nets(torch.float32)]
    engines = [{n: TorchEngine(net, cfg, 10) for n, net in group.items()} for group in nets]
    x, y = _batch(dtype=torch.float32)
    _summed(task, engines[0], x, y)
    task.backward_local(
        engines[1], x, y, dict, lambda name, loss, last: engines[1][name].backward(loss, accumulate=not last)
    )
    for name in NAMES:
        norms = [group[name].clip_grads() for group in engines]
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
        for group in engines:
            group[name].step()
        for a, b in zip(engines[0][name].module.parameters(), engines[1][name].module.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- DeepSpeed, 2 ranks on CPU (gloo)


ZERO_STAGES = (0, 1, 2, 3)


def _deepspeed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Every ZeRO stage in turn, in the same two processes (one start-up of DeepSpeed for the four)."""
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    import deepspeed.comm

    from dist_coop.distributed.env import close_distributed, init_distributed

    torch.set_num_threads(1)
    info = init_distributed("cpu", backend="gloo", need_group=True)
    try:
        records = {zero: _deepspeed_stage(rank, world_size, zero) for zero in ZERO_STAGES}
        # DeepSpeed's communicator started without its shared-memory op (compiled on first use; training never
        # calls it): dist_coop.distributed.engine.skip_deepspeed_shm_op
        records["shm_op"] = deepspeed.comm.comm.cdb.shm_comm_op is not None
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_distributed(info)


def _deepspeed_stage(rank: int, world_size: int, zero: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    from dist_coop.distributed.engine import DeepSpeedEngine

    overrides = ["--optim.lr=1", "--optim.momentum=0", "--optim.weight_decay=0", "--optim.schedule=constant"]
    cfg = load_config(None, [*overrides, "--optim.grad_clip=0", f"--dist.zero_stage={zero}"])
    singletons = [dist.new_group([r]) for r in range(world_size)]
    task = CooperativeTask(CoopConfig(scaling_factors=FACTORS, **SOLO))
    plain = _nets(torch.float32, names=["teammate_a"])["teammate_a"]
    engines = [
        DeepSpeedEngine(
            _nets(torch.float32, names=["teammate_a"])["teammate_a"],
            cfg.optim,
            cfg.dist,
            10,
            group=dist.group.WORLD,
            singleton=singletons[rank],
            micro_batch=6,
        )
        for _ in range(2)
    ]
    summed, parts = ({"teammate_a": e} for e in engines)

    def part_backward(name, loss, last):
        parts[name].backward(loss, accumulate=not last)

    if zero == 3:
        x, y = _batch(1 + rank, torch.float32)
        try:
            task.backward_local(parts, x, y, dict, part_backward)
        except ValueError as e:
            return {"refused": str(e)}
        return {"refused": ""}

    def step(seed, skip=False, also_summed=False):
        x, y = _batch(seed + rank, torch.float32)  # each rank its own batch: gradients are averaged
        if also_summed:
            _summed_deepspeed(task, summed, x, y)
            summed["teammate_a"].step()
        task.backward_local(parts, x, y, dict, part_backward)
        parts["teammate_a"].step(skip=skip)

    def weights(engine):
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):  # ZeRO-3 holds a partition of each (else: no-op)
            return [p.detach().clone() for p in params]

    def expected(seed):
        """Plain autograd from the parts' engine's weights on both ranks' batches, averaged: SGD at lr 1."""
        with torch.no_grad():
            for p, w in zip(plain.parameters(), weights(engines[1])):
                p.copy_(w)
        grads = []
        for r in range(world_size):
            plain.zero_grad()
            _summed(task, {"teammate_a": plain}, *_batch(seed + r, torch.float32))
            grads.append([p.grad.clone() for p in plain.parameters()])
        return [p.detach() - sum(g) / world_size for p, *g in zip(plain.parameters(), *grads)]

    record = {"expected": [expected(1)]}
    step(1, also_summed=True)
    record["summed"], record["parts"] = weights(engines[0]), [weights(engines[1])]
    step(3, skip=True)  # the parts' engine drops this step's gradients (a step the guard skipped)
    record["parts"].append(weights(engines[1]))
    record["expected"].append(expected(5))
    step(5)
    record["parts"].append(weights(engines[1]))
    return record


def _summed_deepspeed(task, engines, x, y):
    terms = task(engines, x, y)
    for name, engine in engines.items():
        engine.backward(sum(v for k, v in terms.items() if k.startswith(name + "/")))


@pytest.fixture(scope="module")
def deepspeed_records(tmp_path_factory):
    """Both ranks' records of every ZeRO stage, from one run of two processes."""
    out = tmp_path_factory.mktemp("deepspeed_parts")
    start_workers(_deepspeed_worker, (2, free_port(), str(out)), 2)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ZERO_STAGES)
def test_deepspeed_engine_accumulates_parts(deepspeed_records, zero):
    """ZeRO 0, 1 and 2 on 2 ranks: parts accumulated with the boundary marked equal one summed backward and the
    plain autograd average; a skipped step leaves the weights and no gradient behind. ZeRO-3 is refused."""
    for records in deepspeed_records:
        record = records[zero]
        if zero == 3:  # refused, with the reason
            assert "needs DeepSpeed ZeRO stage 0-2" in record["refused"]
            continue
        for a, b, c in zip(record["expected"][0], record["summed"], record["parts"][0]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)
        for a, b in zip(record["parts"][0], record["parts"][1]):
            assert torch.equal(a, b)  # the skipped step moved nothing
        for a, b in zip(record["expected"][1], record["parts"][2]):  # ... and left no gradient behind
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_deepspeed_starts_without_its_shared_memory_op(deepspeed_records):
    """DeepSpeed's communicator would compile (first use: about a minute) and load a C++ shared-memory op
    that only its tensor-parallel inference all-reduce calls; the engine marks it unavailable first."""
    assert [records["shm_op"] for records in deepspeed_records] == [False, False]


# ---------------------------------------------------------------- the loop: train.backward


def _trainer_run(tmp_path, backward, *extra, steps=3):
    from dist_coop.distributed.env import DistInfo
    from tests.dist_helpers import run_steps
    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path / backward, f"--train.backward={backward}", "--train.seed=3", *extra)
    return run_steps(cfg, DistInfo(), steps)


@pytest.mark.parametrize("extra", [[], ["--model.share_prefix=false", "--optim.grad_clip=0.5"]])
def test_loop_in_parts_takes_the_steps_of_the_summed_backward(tmp_path, monkeypatch, extra):
    """Three optimizer steps of every net with train.backward parts equal those of whole: every logged loss
    (a term changes only if an earlier update differed) and every parameter after the last update.

    The scalars of the loss (sums, the probe) are float64 here: in float32 the two paths round differently
    (2e-7 relative after one step) and the tiny nets amplify that ~100x per step, which would hide a real
    difference behind a loose tolerance.
    """
    torch.set_default_dtype(torch.float64)
    try:
        whole = _trainer_run(tmp_path, "whole", *extra)
        calls = []
        monkeypatch.setattr(CooperativeTask, "local_terms", lambda *a: calls.append(a) or pytest.fail("summed path"))
        parts = _trainer_run(tmp_path, "parts", *extra)
    finally:
        torch.set_default_dtype(torch.float32)
    assert not calls and parts["nets"] == ["leader", "teammate_a", "teammate_b"]
    for a, b in zip(parts["losses"], whole["losses"]):
        assert a == pytest.approx(b, rel=1e-6)
    for name, p in whole["params"].items():
        torch.testing.assert_close(parts["params"][name], p, rtol=1e-6, atol=1e-7)


def test_backward_setting_resolves_and_refuses_zero3_parts():
    from dist_coop.config import load_config

    assert load_config(None, []).part_backward()
    assert not load_config(None, ["--dist.engine=deepspeed", "--dist.zero_stage=3"]).part_backward()
    assert load_config(None, ["--dist.engine=deepspeed", "--dist.zero_stage=2"]).part_backward()
    assert not load_config(None, ["--train.backward=whole"]).part_backward()
    with pytest.raises(ValueError, match="train.backward: parts needs DeepSpeed ZeRO stage 0-2"):
        load_config(None, ["--train.backward=parts", "--dist.engine=deepspeed", "--dist.zero_stage=3"])
    with pytest.raises(ValueError, match="train.backward"):
        load_config(None, ["--train.backward=sometimes"])
