import math
from contextlib import contextmanager

import pytest
import torch

from dist_coop.config import CoopConfig
from dist_coop.coop import CooperativeTask, IndependentTask, kd_loss, net_of, sfsl_weights
from dist_coop.coop.losses import cross_entropy
from dist_coop.models import build_model


def test_kd_golden_values():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (0.75, 0.25), p_s = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(0.130812, abs=1e-6)
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1); times T^2 = 4
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(0.1453631, abs=1e-6)
    # batch mean: a second, identical-teacher row adds 0
    s2 = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t2 = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    assert kd_loss(s2, t2, 1.0).item() == pytest.approx(0.130812 / 2, abs=1e-6)
    assert kd_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_mask_counts_only_the_samples_the_teacher_gets_right():
    # row 0: the teacher's top class is 0 (p_t = 0.75 / 0.25), KL 0.130812 as above; row 1: its top class is 1
    s2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    t2 = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    assert kd_loss(s2, t2, 1.0).item() == pytest.approx(0.130812, abs=1e-6)  # both rows: (2 * KL) / 2
    # labels 0, 0: the teacher is right on row 0 only; the sum is still divided by the batch (2)
    masked = kd_loss(s2, t2, 1.0, torch.tensor([0, 0]))
    assert masked.item() == pytest.approx(0.130812 / 2, abs=1e-6)
    masked.backward()
    assert s2.grad[0].abs().sum() > 0 and s2.grad[1].abs().sum() == 0  # a wrong teacher teaches nothing
    assert kd_loss(s2, t2, 2.0, torch.tensor([0, 1])).item() == pytest.approx(kd_loss(s2, t2, 2.0).item())
    assert kd_loss(s2, t2, 1.0, torch.tensor([1, 0])).item() == 0.0


def test_ce_golden_value_and_label_smoothing():
    z = torch.tensor([[math.log(3.0), 0.0]])
    y = torch.tensor([0])
    assert cross_entropy(z, y).item() == pytest.approx(-math.log(0.75), abs=1e-6)
    # smoothing 0.2 over 2 classes: target (0.9, 0.1)
    expected = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    assert cross_entropy(z, y, 0.2).item() == pytest.approx(expected, abs=1e-6)


def test_kd_teacher_gets_no_gradient():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_sfsl_weights():
    w = sfsl_weights([0.25, 0.5, 0.75, 1.0], gamma=1.0)
    # s^-1 = 4, 2, 4/3; mean 22/9
    assert w == pytest.approx({0.25: 36 / 22, 0.5: 18 / 22, 0.75: 12 / 22})
    assert sum(w.values()) / 3 == pytest.approx(1.0)
    assert sfsl_weights([0.25, 0.5, 1.0], gamma=0.0) == {0.25: 1.0, 0.5: 1.0}
    w2 = sfsl_weights([0.25, 0.5, 1.0], gamma=2.0)  # 16, 4 -> mean 10
    assert w2 == pytest.approx({0.25: 1.6, 0.5: 0.4})
    assert sfsl_weights([1.0], 1.0) == {}


class FixedNet:
    """Stands in for an AdaptiveNet: returns fixed logits per depth, counts forwards."""

    def __init__(self, logits_by_depth):
        self.logits, self.depth, self.calls = logits_by_depth, 1.0, []

    def set_depth(self, s):
        self.depth = s

    @contextmanager
    def at_depth(self, s):
        previous, self.depth = self.depth, s
        try:
            yield self
        finally:
            self.depth = previous

    def stage_gates(self):
        return []

    def __call__(self, x):
        self.calls.append(self.depth)
        return self.logits[self.depth]


def _t(*v):
    return torch.tensor([list(v)])


def test_cooperative_objective_golden_values():
    """Every term of docs/design.md, *Losses*, on hand-picked logits (batch 1, 2 classes, label 0)."""
    ln3 = math.log(3.0)
    nets = {
        "leader": FixedNet({1.0: _t(ln3, 0.0)}),  # p = (0.75, 0.25)
        "teammate_a": FixedNet({1.0: _t(0.0, 0.0), 0.5: _t(0.0, ln3)}),  # p = (.5, .5); sub (.25, .75)
        "teammate_b": FixedNet({1.0: _t(0.0, ln3), 0.5: _t(0.0, 0.0)}),  # p = (.25, .75); sub (.5, .5)
    }
    cfg = CoopConfig(scaling_factors=(0.5, 1.0), temperature=1.0, alpha=0.5, beta=2.0, gamma=1.0)
    terms = CooperativeTask(cfg)(nets, torch.zeros(1), torch.tensor([0]))

    def kl(p, q):  # KL(p || q)
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    half, lead, b_full = (0.5, 0.5), (0.75, 0.25), (0.25, 0.75)
    expected = {
        "leader/ce@1.0": -math.log(0.75),
        "teammate_a/ce@1.0": -math.log(0.5),
        "teammate_a/kd_peer@1.0": 0.5 * kl(b_full, half),
        "teammate_a/kd_leader@1.0": 2.0 * kl(lead, half),
        # one sub-net: w(0.5) = 1
        "teammate_a/ce@0.5": -math.log(0.25),
        "teammate_a/kd_self@0.5": kl(half, (0.25, 0.75)),
        "teammate_a/kd_peer@0.5": 0.5 * kl(b_full, (0.25, 0.75)),
        "teammate_b/ce@1.0": -math.log(0.25),
        "teammate_b/kd_peer@1.0": 0.5 * kl(half, b_full),
        "teammate_b/kd_leader@1.0": 2.0 * kl(lead, b_full),
        "teammate_b/ce@0.5": -math.log(0.5),
        "teammate_b/kd_self@0.5": kl(b_full, half),
        "teammate_b/kd_peer@0.5": 0.5 * kl(half, half),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-6), name
    # one forward per net and per sub-net
    assert nets["leader"].calls == [1.0]
    assert nets["teammate_a"].calls == [1.0, 0.5] and nets["teammate_b"].calls == [1.0, 0.5]


def test_sfsl_weights_multiply_sub_net_terms():
    z = {1.0: _t(1.0, 0.0), 0.25: _t(0.0, 1.0), 0.5: _t(0.3, 0.1)}
    nets = {"teammate_a": FixedNet(z)}
    base = dict(scaling_factors=(0.25, 0.5, 1.0), teammates=1, leader=False, beta=0.0, temperature=1.0)
    uniform = CooperativeTask(CoopConfig(**base, gamma=0.0))(nets, None, torch.tensor([1]))
    sfsl = CooperativeTask(CoopConfig(**base, gamma=1.0))(nets, None, torch.tensor([1]))
    w = sfsl_weights([0.25, 0.5], 1.0)
    for s in (0.25, 0.5):
        for term in ("ce", "kd_self"):
            key = f"teammate_a/{term}@{s}"
            assert sfsl[key].item() == pytest.approx(w[s] * uniform[key].item(), rel=1e-6)
    assert not any("kd_peer" in k or "kd_leader" in k for k in sfsl)


def test_ablation_ladder_terms():
    """Each rung of the ladder is a config: which terms exist."""
    zs = {s: torch.randn(1, 3) for s in (0.25, 0.5, 1.0)}
    mk = lambda: {n: FixedNet(zs) for n in ("leader", "teammate_a", "teammate_b")}  # noqa: E731
    y = torch.tensor([2])
    f = (0.25, 0.5, 1.0)
    full_only = CooperativeTask(CoopConfig(scaling_factors=f, teammates=1, leader=False, beta=0, sub_nets=False))(
        mk(), None, y
    )
    assert set(full_only) == {"teammate_a/ce@1.0"}
    self_only = CooperativeTask(CoopConfig(scaling_factors=f, teammates=1, leader=False, beta=0, gamma=0))(
        mk(), None, y
    )
    assert {net_of(k) for k in self_only} == {"teammate_a"} and "teammate_a/kd_self@0.25" in self_only
    interactive = CooperativeTask(CoopConfig(scaling_factors=f, leader=False, beta=0))(mk(), None, y)
    assert "teammate_b/kd_peer@0.25" in interactive and "leader/ce@1.0" not in interactive
    full = CooperativeTask(CoopConfig(scaling_factors=f))(mk(), None, y)
    assert "teammate_a/kd_leader@1.0" in full and "leader/kd_team@1.0" not in full
    with_team = CooperativeTask(CoopConfig(scaling_factors=f, leader_kd=0.5))(mk(), None, y)
    assert "leader/kd_team@1.0" in with_team
    indep = IndependentTask(CoopConfig(scaling_factors=f))
    names = {n: FixedNet(zs) for n in (s.name for s in indep.specs)}
    terms = indep(names, None, y)
    assert set(terms) == {"independent_0.25/ce@0.25", "independent_0.5/ce@0.5", "independent_1.0/ce@1.0"}
    assert [s.metric(s.train_depth) for s in indep.specs] == ["independent@0.25", "independent@0.5", "independent@1.0"]


def _real_nets():
    torch.manual_seed(0)
    return {
        n: build_model("resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1, num_classes=5)
        for n in ("leader", "teammate_a", "teammate_b")
    }


def test_gradient_flow_teachers_get_nothing():
    nets = _real_nets()
    task = CooperativeTask(CoopConfig(scaling_factors=(0.25, 0.5, 1.0)))
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 5, (4,))
    terms = task(nets, x, y)
    for term, owner in (
        ("teammate_a/kd_peer@1.0", "teammate_a"),
        ("teammate_a/kd_leader@1.0", "teammate_a"),
        ("teammate_b/kd_peer@0.25", "teammate_b"),
    ):
        for net in nets.values():
            net.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        for name, net in nets.items():
            has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
            assert has_grad == (name == owner), (term, name)


def test_self_kd_teacher_is_detached():
    """The sub-net's KD from its own full net trains the sub-net only: same gradient as a constant teacher."""
    nets = _real_nets()
    task = CooperativeTask(CoopConfig(scaling_factors=(0.25, 0.5, 1.0), teammates=1, leader=False, beta=0))
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 5, (4,))
    net = nets["teammate_a"]
    terms = task({"teammate_a": net}, x, y)
    net.zero_grad(set_to_none=True)
    terms["teammate_a/kd_self@0.25"].backward()
    got = [p.grad.clone() if p.grad is not None else None for p in net.parameters()]
    # the same term with the teacher as a constant tensor
    with torch.no_grad():
        teacher = net(x)  # depth 1.0, train mode: BN batch statistics as in the task
    net.set_depth(0.25)
    net.zero_grad(set_to_none=True)
    w = sfsl_weights([0.25, 0.5], 1.0)[0.25]
    (w * kd_loss(net(x), teacher, task.cfg.temperature)).backward()
    for a, p in zip(got, net.parameters()):
        b = p.grad
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and a term's total gradient does reach the depth-1.0-only blocks only via the full-net terms
    skipped = net.stages[0][4]
    assert all(p.grad is None for p in skipped.parameters())
