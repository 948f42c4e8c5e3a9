"""Shared work computed once (model.share_prefix): exactly the naive path, with fewer block runs."""

import pytest
import torch

from dist_coop.config import load_config
from dist_coop.coop.losses import cross_entropy
from dist_coop.models import build_model
from dist_coop.models.masks import branch_starts, depth_masks
from dist_coop.models.registry import build_from_config

FACTORS = (0.25, 0.5, 0.75, 1.0)  # resnet32: 1/3/4/5 blocks per stage


def _nets(dtype=torch.float64, **kw):
    """Two identical resnet32-shaped nets: the naive path and the shared one."""
    nets = []
    for share in (False, True):
        torch.manual_seed(0)
        net = build_model("resnet32", FACTORS, width=4, in_channels=1, num_classes=5, share_prefix=share, **kw)
        nets.append(net.to(dtype))
    return nets


def _count_runs(net):
    """Runs of each stage's blocks and of the stem, counted by forward hooks."""
    counts = {"stem": 0, "stage1": 0, "stage2": 0, "stage3": 0}

    def count(key):
        def hook(module, args, out):
            counts[key] += 1

        return hook

    net.backbone.conv1.register_forward_hook(count("stem"))
    for i, stage in enumerate(net.stages, start=1):
        for block in stage:
            block.register_forward_hook(count(f"stage{i}"))
    return counts


def test_branch_starts_of_resnet32_prefix_and_spread():
    prefix = depth_masks((5, 5, 5), FACTORS, "prefix")
    # stage 1 keeps blocks 0 / 0-2 / 0-3 / 0-4: blocks 0-3 shared, 0.25 leaves at 1, 0.5 at 3, 0.75 and 1.0 at 4
    assert branch_starts(prefix, FACTORS) == {0.25: 1, 0.5: 3, 0.75: 4, 1.0: 4}
    spread = depth_masks((5, 5, 5), FACTORS, "spread")  # stage 1: {0} {0,2,4} {0,1,2,4} {0..4}
    assert branch_starts(spread, FACTORS) == {0.25: 2, 0.5: 2, 0.75: 3, 1.0: 3}
    assert branch_starts(prefix, (0.5,)) == {0.5: -1}  # one depth shares nothing


@pytest.mark.parametrize(
    "keep, gate, head",
    [
        ("prefix", "learned", "shared"),
        ("prefix", "none", "shared"),
        ("spread", "learned", "shared"),
        ("prefix", "learned", "private"),
    ],
)
def test_shared_path_equals_naive_losses_gradients_and_bn_buffers(keep, gate, head):
    """float64: logits and losses bit for bit, every BN buffer bit for bit, every gradient to rounding."""
    naive, shared = _nets(keep=keep, gate=gate, head=head)
    assert naive.branch_starts(FACTORS) == dict.fromkeys(FACTORS, -1)
    assert min(shared.branch_starts(FACTORS).values()) >= 1
    x, y = torch.randn(6, 1, 12, 12, dtype=torch.float64), torch.randint(0, 5, (6,))
    losses = []
    for net in (naive, shared):
        logits = net.forward_depths(x, FACTORS)
        loss = sum((1 + s) * cross_entropy(z, y) for s, z in logits.items())  # weights: every depth counts differently
        loss.backward()
        losses.append((loss.detach(), logits))
    assert torch.equal(losses[0][0], losses[1][0])
    for s in FACTORS:
        assert torch.equal(losses[0][1][s], losses[1][1][s]), s
    for (name, a), b in zip(naive.named_parameters(), shared.parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=name)
    for (name, a), b in zip(naive.named_buffers(), shared.buffers()):
        assert torch.equal(a, b), name
    # every depth's statistics row moved (each depth's own forward would have updated it)
    assert (shared.backbone.bn1.running_mean != 0).all()


def test_shared_path_equals_naive_in_float32():
    naive, shared = _nets(torch.float32)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
    for net in (naive, shared):
        sum(cross_entropy(z, y) for z in net.forward_depths(x, FACTORS).values()).backward()
    for a, b in zip(naive.parameters(), shared.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(naive.buffers(), shared.buffers()):
        assert torch.equal(a, b)


def test_stage1_runs_5_blocks_instead_of_13():
    naive, shared = _nets()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    runs = {}
    for name, net in (("naive", naive), ("shared", shared)):
        runs[name] = _count_runs(net)
        net.forward_depths(x, FACTORS)
    assert runs["naive"] == {"stem": 4, "stage1": 1 + 3 + 4 + 5, "stage2": 13, "stage3": 13}
    # after stage 1 each depth's input differs (a different number of stage-1 blocks): nothing more is shared
    assert runs["shared"] == {"stem": 1, "stage1": 5, "stage2": 13, "stage3": 13}


@pytest.mark.parametrize("case", ["bn_private", "eval", "off", "one_depth"])
def test_naive_path_where_sharing_is_not_exact(case):
    kw = {"bn": "private"} if case == "bn_private" else {}
    _, net = _nets(**kw)
    if case == "off":
        net.share_prefix = False
    if case == "eval":
        net.eval()
    depths = (0.5,) if case == "one_depth" else FACTORS
    assert net.branch_starts(depths) == dict.fromkeys(depths, -1)
    runs = _count_runs(net)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out = net.forward_depths(x, depths)
    assert runs["stem"] == len(depths)
    for s in depths:  # each depth's whole forward: what net(x) gives at that depth
        with net.at_depth(s):
            assert torch.equal(out[s], net(x)), s


def test_model_share_prefix_option():
    cfg = load_config(None, ["--model.width=2", "--model.share_prefix=false"])
    assert build_from_config(cfg.model, FACTORS).share_prefix is False
    assert build_from_config(load_config(None, ["--model.width=2"]).model, FACTORS).share_prefix is True
    with pytest.raises(ValueError, match="share_prefix"):
        load_config(None, ["--model.share_prefix=3"])
