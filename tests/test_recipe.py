"""The recipe mechanisms: distillation ramp, gate regulariser, clipping per role, and what the trainer logs of them."""

import math

import pytest
import torch

from dist_coop.config import CoopConfig, load_config
from dist_coop.coop import CooperativeTask
from dist_coop.coop.losses import gate_penalty, kd_ramp
from dist_coop.coop.task import build_task
from dist_coop.data import build_data
from dist_coop.distributed.engine import clip_threshold, grad_stats
from dist_coop.models import build_model
from dist_coop.models.adaptive import gate_stats
from dist_coop.optim import build_optimizer, lr_divisors, param_groups
from dist_coop.trainer import Trainer
from tests.helpers import load_experiment, tiny_config


def test_kd_ramp_values():
    # warm-up over 30 % of 100 steps: linear from 0 at step 0 to 1 at step 30, then 1
    assert kd_ramp(0, 100, 0.3) == 0.0
    assert kd_ramp(15, 100, 0.3) == pytest.approx(0.5)
    assert kd_ramp(29, 100, 0.3) == pytest.approx(29 / 30)
    assert kd_ramp(30, 100, 0.3) == 1.0
    assert kd_ramp(99, 100, 0.3) == 1.0
    assert kd_ramp(0, 100, 0.0) == 1.0  # no warm-up: full weight from the start
    with pytest.raises(ValueError, match="fraction of training"):
        kd_ramp(0, 100, 1.5)
    with pytest.raises(ValueError, match="coop.kd_warmup"):
        CoopConfig(kd_warmup=-0.1)


def test_gate_penalty_by_hand():
    gates = [torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([2.0])]
    assert gate_penalty(gates).item() == pytest.approx(0.25 + 0.0 + 1.0)
    g = torch.tensor([0.2], requires_grad=True)
    gate_penalty([g]).backward()
    assert g.grad.item() == pytest.approx(2 * (0.2 - 1.0))  # d/dg (g - 1)^2
    with pytest.raises(ValueError, match="at least one gate"):
        gate_penalty([])


def test_gate_stats_per_stage():
    net = build_model("resnet20", [0.5, 1.0], width=4, in_channels=1)
    with torch.no_grad():
        net.stages[2][1].bn2.gate.fill_(0.1)
        net.stages[2][2].bn2.gate.fill_(0.7)
    stats = gate_stats(net)
    assert stats["stage1/min"] == 1.0 and stats["stage1/mean"] == 1.0
    assert stats["stage3/min"] == pytest.approx(0.1) and stats["stage3/mean"] == pytest.approx(0.4)
    assert gate_stats(build_model("resnet20", [1.0], width=4, gate="none")) == {}


def test_clip_threshold_scales_with_terms_and_grad_stats():
    assert clip_threshold(2.0, "none", 12) == 2.0
    assert clip_threshold(2.0, "terms", 12) == 24.0
    assert clip_threshold(0.0, "terms", 12) == 0.0  # off stays off
    assert grad_stats(10.0, 5.0)["clip_coef"] == pytest.approx(0.5, rel=1e-6)
    assert grad_stats(1.0, 5.0) == {"grad_norm": 1.0, "clip_coef": 1.0}
    assert grad_stats(10.0, 0.0)["clip_coef"] == 1.0


class _Net:
    """Two-class stand-in net with fixed logits at every depth and one learnable gate."""

    def __init__(self, logits):
        self.logits, self.gate = logits, torch.nn.Parameter(torch.tensor([0.5]))

    def at_depth(self, s):
        import contextlib

        return contextlib.nullcontext(self)

    def stage_gates(self):
        return [[self.gate]]

    def __call__(self, x):
        return self.logits


def test_ramp_scales_every_kd_term_and_num_terms_counts_them():
    z = {n: torch.tensor([[0.0, v]]) for n, v in (("leader", 1.0), ("teammate_a", 0.0), ("teammate_b", -1.0))}
    nets = {n: _Net(v) for n, v in z.items()}
    cfg = CoopConfig(
        scaling_factors=(0.5, 1.0), temperature=1.0, kd_warmup=0.5, peer_warmup=0.5, gate_reg=0.1, sub_guided=True
    )
    task = CooperativeTask(cfg)
    task.set_progress(0, 10)
    first = task(nets, None, torch.tensor([0]))
    task.set_progress(2, 10)  # 2 / (0.5 * 10) = 0.4
    mid = task(nets, None, torch.tensor([0]))
    task.set_progress(7, 10)
    late = task(nets, None, torch.tensor([0]))
    for key in late:
        if "/kd_" in key:
            assert first[key].item() == 0.0
            assert mid[key].item() == pytest.approx(0.4 * late[key].item(), rel=1e-6)
        else:  # CE and the gate regulariser are not ramped
            assert first[key].item() == pytest.approx(late[key].item())
    assert late["teammate_a/gate_reg@1.0"].item() == pytest.approx(0.1 * (0.5 - 1.0) ** 2)
    assert "teammate_a/kd_leader@0.5" in late  # sub_guided: sub-nets distil from the Leader too
    for name in ("leader", "teammate_a", "teammate_b"):
        own = [k for k in late if k.startswith(f"{name}/") and "gate_reg" not in k]
        assert task.num_terms(name) == len(own), name


def test_trainer_logs_clip_coef_grad_norm_and_gates(tmp_path, fmnist_root, recorder):
    cfg = tiny_config(tmp_path, "--optim.grad_clip=0.5", "--optim.clip_scale=terms", "--coop.kd_warmup=0.5")
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir=tmp_path, tracker=recorder)
    x, y = next(data.train.epoch(0))
    logs = trainer.train_step(x, y)
    for name in ("leader", "teammate_a", "teammate_b"):
        norm, coef = logs[f"train/grad_norm/{name}"], logs[f"train/clip_coef/{name}"]
        threshold = 0.5 * trainer.task.num_terms(name)
        assert math.isfinite(norm) and norm > 0
        assert coef == pytest.approx(min(1.0, threshold / norm), rel=1e-4)
    assert trainer.task.num_terms("teammate_a") > trainer.task.num_terms("leader") == 1
    assert logs["train/kd_scale"] == 0.0  # step 0 of the ramp
    metrics = trainer.evaluate("trained")
    for name in ("leader", "teammate_a", "teammate_b"):
        for stage in (1, 2, 3):
            assert 0.0 < metrics[f"val/gate/{name}/stage{stage}/min"] <= metrics[f"val/gate/{name}/stage{stage}/mean"]


def test_clip_threshold_reaches_the_engines(tmp_path):
    cfg = load_config(None, ["--optim.grad_clip=2", "--optim.clip_scale=terms"])
    task = CooperativeTask(cfg.coop)
    # default objective: Teammate = CE + kd_peer + kd_leader at s=1, (CE + kd_self + kd_peer) per sub-net
    assert task.num_terms("teammate_a") == 3 + 3 * 3
    assert clip_threshold(cfg.optim.grad_clip, cfg.optim.clip_scale, task.num_terms("leader")) == 2.0


def test_lr_divisors_by_depths_and_by_blocks():
    assert load_config(None, []).optim.lr_scale == "blocks_sqrt"
    cfg = load_config(None, ["--optim.lr=0.2", "--optim.lr_scale=depths"])
    net = build_model("resnet20", (0.25, 0.5, 1.0), width=4)  # 3 blocks per stage: 1 / 2 / 3 kept
    depths = (1.0, 0.25, 0.5)
    by_depths = lr_divisors(net, cfg.optim, depths)
    assert set(by_depths.values()) == {3} and len(by_depths) == len(list(net.parameters()))
    blocks = lr_divisors(net, load_config(None, ["--optim.lr_scale=blocks"]).optim, depths)
    stage = net.stages[1]
    assert {blocks[id(p)] for p in stage[0].parameters()} == {3}  # the first block runs at every depth
    assert {blocks[id(p)] for p in stage[1].parameters()} == {2}  # s = 0.5 and 1
    assert {blocks[id(p)] for p in stage[2].parameters()} == {1}  # s = 1 only
    assert blocks[id(net.backbone.conv1.weight)] == blocks[id(net.backbone.fc.weight)] == 3
    groups = param_groups(net, 5e-4, 0.3, blocks)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.1, 0.15, 0.15, 0.3, 0.3])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0] * 3
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert lr_divisors(net, cfg.optim, (1.0,)) == {}  # the Leader, an independent net
    root = lr_divisors(net, load_config(None, ["--optim.lr_scale=blocks_sqrt"]).optim, depths)
    assert root.keys() == blocks.keys() and all(root[k] == pytest.approx(blocks[k] ** 0.5) for k in blocks)
    assert root[id(stage[0].conv1.weight)] == pytest.approx(3**0.5) and root[id(stage[2].conv1.weight)] == 1.0
    quarter = lr_divisors(
        net, load_config(None, ["--optim.lr_scale=blocks", "--optim.lr_scale_power=0.25"]).optim, depths
    )
    assert [quarter[id(p)] for p in stage[1].parameters()] == pytest.approx(
        [2**0.25] * len(list(stage[1].parameters()))
    )
    assert quarter[id(net.backbone.fc.weight)] == pytest.approx(3**0.25) and quarter[id(stage[2].conv1.weight)] == 1.0
    halved = lr_divisors(
        net, load_config(None, ["--optim.lr_scale=blocks", "--optim.lr_scale_power=0.5"]).optim, depths
    )
    assert halved == pytest.approx(root)  # blocks_sqrt is blocks at power 0.5
    for bad in (["--optim.lr_scale_power=0"], ["--optim.lr_scale_power=1.5"], ["--optim.lr_scale_power=0.25"]):
        with pytest.raises(ValueError, match="lr_scale_power"):  # the last: the default blocks_sqrt has its own power
            load_config(None, bad)
    assert lr_divisors(net, load_config(None, ["--optim.lr_scale=none"]).optim, depths) == {}
    assert lr_divisors(net, load_config(None, ["--optim.name=adamw"]).optim, depths) == {}  # Adam: scale-free step
    with pytest.raises(ValueError, match="lr_scale"):
        load_config(None, ["--optim.lr_scale=terms"])


def test_lr_divisors_weighted_by_the_sfsl_weights():
    """``weighted``: a block's divisor sums the loss weights of the depths that run it (by hand, gamma 1 on
    0.25 / 0.5: w = 4/3 and 2/3, the full depth 1)."""
    net = build_model("resnet20", (0.25, 0.5, 1.0), width=4)
    spec = CooperativeTask(load_config(None, ["--coop.scaling_factors=[0.25,0.5,1.0]"]).coop).specs[1]
    assert spec.trained_weights() == pytest.approx({0.25: 4 / 3, 0.5: 2 / 3, 1.0: 1.0})
    weighted = lr_divisors(net, load_config(None, ["--optim.lr_scale=weighted"]).optim, spec.trained_weights())
    stage = net.stages[2]
    # every depth runs the first block: 4/3 + 2/3 + 1
    assert sorted({weighted[id(p)] for p in stage[0].parameters()}) == pytest.approx([3.0])
    assert sorted({weighted[id(p)] for p in stage[1].parameters()}) == pytest.approx([5 / 3])  # s = 0.5 and 1
    assert sorted({weighted[id(p)] for p in stage[2].parameters()}) == pytest.approx([1.0])  # s = 1 only
    assert weighted[id(net.backbone.fc.weight)] == pytest.approx(3.0)
    blocks = lr_divisors(net, load_config(None, ["--optim.lr_scale=blocks"]).optim, spec.trained_weights())
    # blocks counts the depths, ignoring their weights
    assert blocks[id(next(stage[1].parameters()))] == 2


def test_keep_decay_gives_every_scaled_group_the_plain_nets_decay_per_step():
    """SGD's decay per step is lr * wd: at lr / d a shared weight would decay d times more slowly; keep_decay
    multiplies its group's wd by d (resnet20, s = 0.25 / 0.5 / 1: divisors 3, 2, 1)."""
    net = build_model("resnet20", (0.25, 0.5, 1.0), width=4)
    cfg = load_config(None, ["--optim.lr=0.3", "--optim.keep_decay=true", "--optim.lr_scale=blocks"]).optim
    assert load_config(None, []).optim.keep_decay is False
    blocks = lr_divisors(net, cfg, (1.0, 0.25, 0.5))
    groups = param_groups(net, 5e-4, 0.3, blocks, keep_decay=True)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.1, 0.15, 0.15, 0.3, 0.3])
    decays = [1.5e-3, 0.0, 1e-3, 0.0, 5e-4, 0.0]
    assert [g["weight_decay"] for g in groups] == pytest.approx(decays)
    assert [g["lr"] * g["weight_decay"] for g in groups if g["weight_decay"]] == pytest.approx([1.5e-4] * 3)
    # one SGD step on a zero gradient shrinks every decayed weight by lr * wd = 1.5e-4, whatever its group
    w = net.stages[1][0].conv1.weight
    before = w.detach().clone()
    opt = torch.optim.SGD(groups, lr=0.3)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(w.detach(), before * (1 - 1.5e-4))
    built = build_optimizer(net, cfg, (1.0, 0.25, 0.5)).param_groups  # the option reaches the optimizer
    assert [g["weight_decay"] for g in built] == pytest.approx(decays)
    with pytest.raises(ValueError, match="keep_decay"):
        load_config(None, ["--optim.keep_decay=3"])


@pytest.mark.parametrize("scale", ["depths", "blocks", "weighted", "blocks_sqrt", "none"])
def test_lr_scale_reaches_each_net_and_its_log(tmp_path, fmnist_root, recorder, scale):
    # two steps: the groups and the logged ratio are the same at every step
    cfg = tiny_config(
        tmp_path, "--optim.lr=0.2", "--optim.warmup_steps=0", f"--optim.lr_scale={scale}", "--train.max_steps=2"
    )
    data = build_data(cfg.data, seed=0)
    trainer = Trainer(cfg, data, run_dir=tmp_path, tracker=recorder)
    depths = {spec.name: len(spec.trained_depths) for spec in trainer.task.specs}
    assert depths == {"leader": 1, "teammate_a": 3, "teammate_b": 3}  # tiny config: s = 0.25, 0.5, 1
    for name, engine in trainer.engines.items():
        lrs = sorted({g["lr"] for g in engine.optimizer.param_groups})
        want = {"depths": [0.2 / depths[name]], "none": [0.2]}.get(scale, [0.2 / d for d in range(depths[name], 0, -1)])
        if scale == "weighted" and depths[name] == 3:  # SFSL weights 4/3 and 2/3 (gamma 1), the full depth 1
            want = [0.2 / 3, 0.2 / (5 / 3), 0.2]
        if scale == "blocks_sqrt":
            want = [0.2 / d**0.5 for d in range(depths[name], 0, -1)]
        assert lrs == pytest.approx(want)
    trainer.train()
    logged = next(m for m in recorder.metrics.values() if "train/lr/leader" in m)
    divisor = {"none": 1, "blocks_sqrt": 3**0.5}.get(scale, 3)
    assert logged["train/lr/teammate_a"] == pytest.approx(logged["train/lr/leader"] / divisor)


def test_lr_scale_leaves_independent_nets_at_the_full_lr(tmp_path, fmnist_root, recorder):
    cfg = tiny_config(tmp_path, "--optim.lr=0.2", "--optim.warmup_steps=0", "--coop.task=independent")
    trainer = Trainer(cfg, build_data(cfg.data, seed=0), run_dir=tmp_path, tracker=recorder)
    lrs = [engine.optimizer.param_groups[0]["lr"] for engine in trainer.engines.values()]
    assert len(lrs) == 3 and lrs == pytest.approx([0.2] * 3)


def _outputs(net, x):
    out = {}
    with torch.no_grad():
        for s in net.scaling_factors:
            with net.at_depth(s):
                out[s] = net(x)
    return out


def test_zero_init_blocks_start_as_identity():
    """model.zero_init: every skippable block's branch starts at 0, so every depth computes the same function."""
    x = torch.randn(2, 1, 16, 16)
    torch.manual_seed(0)
    net = build_model("resnet20", [0.25, 1.0], width=4, in_channels=1, zero_init=True).eval()
    out = _outputs(net, x)
    assert torch.allclose(out[0.25], out[1.0])
    assert net.stages[0][1].bn2.weight.abs().sum() == 0  # skippable: zeroed
    assert net.stages[0][0].bn2.weight.abs().sum() > 0  # block 0 always runs: left as is
    torch.manual_seed(0)
    out = _outputs(build_model("resnet20", [0.25, 1.0], width=4, in_channels=1).eval(), x)
    assert not torch.allclose(out[0.25], out[1.0])


def test_head_norm_gives_the_classifier_normalised_features_at_every_depth():
    """model.head_norm: whatever the depth, the shared classifier gets features of the same scale."""
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    scales = {}
    for head_norm in (False, True):
        net = build_model("resnet32", [0.25, 1.0], width=4, in_channels=1, head_norm=head_norm).train()
        seen: dict[str, torch.Tensor] = {}

        def keep(module, inputs, output, seen=seen):
            seen["f"] = inputs[0].detach()

        net.backbone.fc.register_forward_hook(keep)
        for s in net.scaling_factors:
            with net.at_depth(s):
                net(x)
            scales[head_norm, s] = seen["f"].std(0).mean().item()  # per-feature spread over the batch
    assert scales[True, 0.25] == pytest.approx(1.0, rel=0.05) and scales[True, 1.0] == pytest.approx(1.0, rel=0.05)
    assert scales[False, 1.0] > 1.5 * scales[False, 0.25]  # the residual adds grow the last stage's output
    net = build_model("resnet20", [0.5, 1.0], width=4, in_channels=1, head_norm=True)
    head = net.backbone.avgpool[1]
    assert head.running_mean.shape == (2, 16)  # one row of statistics per depth


def test_kd_norm_divides_each_depth_by_its_current_weight_sum():
    z = {n: torch.tensor([[0.0, v]]) for n, v in (("leader", 1.0), ("teammate_a", 0.0), ("teammate_b", -1.0))}
    nets = {n: _Net(v) for n, v in z.items()}
    base = dict(
        scaling_factors=(0.5, 1.0), temperature=1.0, kd_warmup=0.5, peer_warmup=0.5, alpha=0.5, beta=2.0, gate_reg=0.1
    )
    plain, normed = CooperativeTask(CoopConfig(**base)), CooperativeTask(CoopConfig(**base, kd_norm=True))
    for step, r in ((0, 0.0), (2, 0.4), (9, 1.0)):
        plain.set_progress(step, 10)
        normed.set_progress(step, 10)
        a, b = plain(nets, None, torch.tensor([0])), normed(nets, None, torch.tensor([0]))
        full = 1.0 + r * 0.5 + r * 2.0  # CE + alpha * KD_peer + beta * KD_leader
        sub = 1.0 + r + r * 0.5  # CE + KD_self + alpha * KD_peer
        for key in a:
            name, rest = key.split("/")
            if name == "leader" or "gate_reg" in rest:
                expected = a[key].item()  # the Leader has one weight (1); the regulariser is not a depth's term
            else:
                expected = a[key].item() / (full if rest.endswith("@1.0") else sub)
            assert b[key].item() == pytest.approx(expected, rel=1e-6), (step, key)
    # after the ramp a depth's weights sum to 1: its terms are a convex mix of label and teachers
    sub_keys = [k for k in b if k.startswith("teammate_a/") and k.endswith("@0.5")]
    assert len(sub_keys) == 3


def test_kd_mask_drops_every_kd_term_whose_teacher_is_wrong():
    # two classes, label 0; each stand-in net has the same logits at every depth (so its self-KD is 0 anyway)
    z = {n: torch.tensor([[0.0, v]]) for n, v in (("leader", 1.0), ("teammate_a", 0.5), ("teammate_b", -1.0))}
    nets = {n: _Net(v) for n, v in z.items()}
    base = dict(scaling_factors=(0.5, 1.0), temperature=1.0, kd_warmup=0.0, peer_warmup=0.0, leader_kd=1.0)
    plain, masked = CooperativeTask(CoopConfig(**base)), CooperativeTask(CoopConfig(**base, kd_mask="correct"))
    y = torch.tensor([0])
    a, b = plain(nets, None, y), masked(nets, None, y)
    assert set(a) == set(b)
    # the Leader (top class 1) and Teammate A (top class 1: 0.5 > 0) are wrong, Teammate B (top class 0) is right
    wrong = {"teammate_a/kd_leader@1.0", "teammate_b/kd_leader@1.0", "teammate_b/kd_peer@1.0",
             "teammate_b/kd_peer@0.5"}  # fmt: skip
    for key in a:
        if key in wrong:
            assert a[key].item() > 0 and b[key].item() == 0.0, key
        else:  # CE, and the KD terms whose teacher is right (B's, the Teammates' mean 0 vs -0.25: right)
            assert b[key].item() == pytest.approx(a[key].item(), rel=1e-6), key
    assert b["teammate_a/kd_peer@1.0"].item() > 0 and b["leader/kd_team@1.0"].item() > 0
    with pytest.raises(ValueError, match="kd_mask"):
        CoopConfig(kd_mask="wrong")


def test_peer_warmup_ramps_the_peer_terms_alone():
    z = {n: torch.tensor([[0.0, v]]) for n, v in (("leader", 1.0), ("teammate_a", 0.0), ("teammate_b", -1.0))}
    nets = {n: _Net(v) for n, v in z.items()}
    cfg = CoopConfig(scaling_factors=(0.5, 1.0), temperature=1.0, kd_warmup=0.2, peer_warmup=1.0)
    task = CooperativeTask(cfg)
    task.set_progress(9, 10)
    late = task(nets, None, torch.tensor([0]))
    task.set_progress(10, 10)
    done = task(nets, None, torch.tensor([0]))
    task.set_progress(3, 10)  # kd ramp: min(1, 3 / 2) = 1; peer ramp: 3 / 10
    mid = task(nets, None, torch.tensor([0]))
    for key in done:
        if "/kd_peer" in key:
            assert mid[key].item() == pytest.approx(0.3 * done[key].item(), rel=1e-6)
            assert late[key].item() == pytest.approx(0.9 * done[key].item(), rel=1e-6)
        else:
            assert mid[key].item() == pytest.approx(done[key].item(), rel=1e-6)
    assert any("/kd_peer" in k for k in done) and any("/kd_self" in k for k in done)
    with pytest.raises(ValueError, match="coop.peer_warmup"):
        CoopConfig(peer_warmup=1.5)


def test_grad_alignment_splits_a_teammates_gradient_by_depth():
    """experiments/grad_alignment.py: the per-depth gradients add up to the gradient of the Teammate's summed loss
    (nothing lost or counted twice), and a depth's gradient is zero on the blocks it does not run."""
    ga = load_experiment("grad_alignment")
    cfg = load_config(None, ["--model.width=2", "--model.in_channels=1", "--coop.kd_warmup=0", "--coop.peer_warmup=0"])
    task = build_task(cfg.coop)
    torch.manual_seed(0)
    nets = {s.name: s.build(cfg.model, cfg.coop.scaling_factors).double().train() for s in task.specs}
    x, y = torch.randn(6, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (6,))
    grads = ga.depth_gradients(task, nets, "teammate_a", x, y)
    assert sorted(grads) == [0.25, 0.5, 0.75, 1.0]
    net = nets["teammate_a"]
    net.zero_grad(set_to_none=True)
    soft = {n: m(x).detach() for n, m in nets.items()}
    terms = task.full_terms("teammate_a", net, net(x), y, soft)
    for s in (0.25, 0.5, 0.75):
        with net.at_depth(s):
            terms.update(task.sub_terms("teammate_a", s, net(x), y, soft))
    sum(terms.values()).backward()
    for p in net.parameters():
        total = sum(g[id(p)] for g in grads.values() if id(p) in g)
        torch.testing.assert_close(total, p.grad, rtol=1e-9, atol=1e-12)
    last_block = net.stages[0][-1]  # run by s = 1 only
    assert all(id(p) not in grads[0.25] for p in last_block.parameters())
    groups = ga.shared_groups(net)
    assert set(groups) == {"stem", "classifier"} | {f"stage{i}.block{j}" for i in (1, 2, 3) for j in (0, 1)}
