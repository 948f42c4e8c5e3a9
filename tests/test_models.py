import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dist_coop.infer.cost import active_params, depth_costs
from dist_coop.models import MODELS, DepthBatchNorm2d, DepthLinear, build_model, recalibrate_bn
from dist_coop.models.masks import num_kept

FACTORS = {"resnet20": (0.25, 0.5, 1.0), "resnet18_64": (0.5, 1.0)}


def _torchvision_ok():
    try:
        import torchvision  # noqa: F401

        return True
    except Exception:
        return False


def _factors(name):
    return FACTORS.get(name, (0.25, 0.5, 0.75, 1.0) if name not in ("tv_resnet18", "resnet18_64") else (0.5, 1.0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_contract_over_registry(name):
    """Every backbone: any in_channels / num_classes / input size, every depth runs and is distinct."""
    if name.startswith("tv_") and not _torchvision_ok():
        pytest.skip("torchvision does not import here")
    factors = _factors(name)
    width = 0 if name.startswith("tv_") else 4
    net = build_model(name, factors, width=width, in_channels=2, num_classes=7)
    x = torch.randn(2, 2, 36, 20)
    blocks = []
    for s in factors:
        net.set_depth(s)
        assert net.depth == s
        out = net(x)
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        blocks.append(net.num_blocks())
        assert blocks[-1] == sum(num_kept(n, s) for n in net.stage_sizes)
    assert blocks == sorted(blocks) and len(set(blocks)) == len(blocks)
    with net.at_depth(factors[0]):
        assert net.depth == factors[0]
    assert net.depth == factors[-1]
    with pytest.raises(ValueError, match="not one of this net's depths"):
        net.set_depth(0.33)


def test_stage_sizes_of_cifar_resnets():
    for name, n in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("resnet110", 18)):
        assert build_model(name, [1.0], width=2).stage_sizes == (n, n, n)
    assert build_model("resnet34_64", [1.0], width=2).stage_sizes == (3, 4, 6, 3)


def _count_block_calls(net):
    calls = []
    for stage in net.stages:
        for i, block in enumerate(stage):
            block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    return calls


def test_masked_blocks_are_not_executed():
    net = build_model("resnet32", [0.25, 0.5, 0.75, 1.0], width=8, in_channels=1).eval()
    calls = _count_block_calls(net)
    x = torch.randn(1, 1, 28, 28)
    flops = {}
    for s in (0.25, 1.0):
        calls.clear()
        net.set_depth(s)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        flops[s] = counter.get_total_flops()
        assert len(calls) == net.num_blocks(s)
    assert len(calls) == 15
    # ResNet-32 at 0.25 runs 1 of 5 blocks per stage: stem + 3 blocks (+ shortcuts) + head
    assert flops[0.25] < 0.25 * flops[1.0]
    # a hand count of the skipped blocks' convs: 4 blocks per stage, two 3x3 convs each
    hw = [(28, 28), (14, 14), (7, 7)]
    chans = [8, 16, 32]
    skipped = sum(4 * 2 * (2 * 9 * c * c * h * w) for c, (h, w) in zip(chans, hw))
    assert flops[1.0] - flops[0.25] == skipped


def test_skipped_block_gets_no_gradient_and_gate_learns():
    net = build_model("resnet32", [0.25, 1.0], width=4, in_channels=1)
    net.set_depth(0.25)
    net(torch.randn(4, 1, 16, 16)).sum().backward()
    kept, skipped = net.stages[0][0], net.stages[0][1]
    assert all(p.grad is None for p in skipped.parameters())
    assert all(p.grad is not None for p in kept.parameters())
    net.zero_grad(set_to_none=True)
    net.set_depth(1.0)
    net(torch.randn(4, 1, 16, 16)).sum().backward()
    gate = skipped.bn2.gate
    assert gate is not None and gate.grad is not None and gate.grad.abs() > 0
    assert net.stages[0][0].bn2.gate is None  # block 0 always runs: no gate
    assert build_model("resnet32", [1.0], width=4, gate="none").stages[0][1].bn2.gate is None


def test_skip_is_identity():
    """With m = 0 a block is the identity: a depth-1.0 net whose extra blocks have g = 0 equals depth 0.25."""
    torch.manual_seed(0)
    net = build_model("resnet32", [0.25, 1.0], width=4, in_channels=1, bn="private").eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for stage, mask in zip(net.stages, net.masks[0.25]):
            for keep, block in zip(mask, stage):
                if not keep:
                    block.bn2.gate.zero_()
        net.set_depth(0.25)
        shallow = net(x)
        # copy depth 0.25's BN rows into depth 1.0's so only the mask differs
        for m in net.modules():
            if isinstance(m, DepthBatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean, m.running_var):
                    t[1] = t[0]
        net.set_depth(1.0)
        deep = net(x)
    torch.testing.assert_close(shallow, deep)


def test_per_depth_bn_statistics_are_updated_and_used_per_depth():
    torch.manual_seed(0)
    net = build_model("resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1)
    stem_bn = net.backbone.bn1
    before = stem_bn.running_mean.clone()
    net.train()
    net.set_depth(0.5)
    net(torch.randn(8, 1, 16, 16) * 3 + 2)
    changed = (stem_bn.running_mean != before).any(dim=1)
    assert changed.tolist() == [False, True, False]  # only depth 0.5's row moved
    # evaluation at each depth uses that depth's statistics
    net.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        stem_bn.running_mean[0].fill_(5.0)
        a = net.backbone.bn1(net.backbone.conv1(x))
        net.set_depth(0.25)
        b = net.backbone.bn1(net.backbone.conv1(x))
    assert not torch.allclose(a, b)
    assert stem_bn.weight.shape == (1, 4)  # shared affine
    private = build_model("resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1, bn="private")
    assert private.backbone.bn1.weight.shape == (3, 4)


def test_private_bn_affine_gets_gradient_only_in_its_row():
    net = build_model("resnet32", [0.25, 1.0], width=4, in_channels=1, bn="private")
    net.set_depth(0.25)
    net(torch.randn(4, 1, 16, 16)).sum().backward()
    g = net.backbone.bn1.weight.grad
    assert g[0].abs().sum() > 0 and g[1].abs().sum() == 0


def test_recalibration_gives_exact_batch_average():
    torch.manual_seed(0)
    net = build_model("resnet32", [0.25, 1.0], width=4, in_channels=1)
    batches = [torch.randn(16, 1, 12, 12) * (i + 1) + i for i in range(3)]
    seen = recalibrate_bn(net, iter(batches), 0.25)
    assert seen == 48
    bn = net.backbone.bn1
    with torch.no_grad():
        means = [net.backbone.conv1(b).mean(dim=(0, 2, 3)) for b in batches]
    torch.testing.assert_close(bn.running_mean[0], torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(bn.running_mean[1], torch.zeros(4))  # depth 1.0 untouched


def test_costs_fall_with_depth():
    net = build_model("resnet56", [0.25, 0.5, 0.75, 1.0], width=4)
    costs = depth_costs(net, (3, 32, 32))
    flops = [costs[s].gflops for s in (0.25, 0.5, 0.75, 1.0)]
    params = [costs[s].params for s in (0.25, 0.5, 0.75, 1.0)]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert params == sorted(params)
    assert params[-1] == sum(p.numel() for p in net.parameters())
    assert active_params(net, 0.25) == params[0]
    private = build_model("resnet56", [0.25, 0.5, 0.75, 1.0], width=4, head="private")
    assert active_params(private, 0.25) == params[0]  # one classifier row read per depth
    assert sum(p.numel() for p in private.parameters()) == params[-1] + 3 * (16 * 10 + 10)


@pytest.mark.skipif(not _torchvision_ok(), reason="torchvision does not import here")
def test_torchvision_wrapper_is_the_same_net_at_full_depth():
    """Wrapping keeps the parameter names and, at depth 1.0, the outputs of the plain model."""
    import copy

    import torchvision

    from dist_coop.models import AdaptiveNet

    torch.manual_seed(0)
    plain = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    net = AdaptiveNet(
        copy.deepcopy(plain), stage_names=["layer1", "layer2", "layer3", "layer4"], scaling_factors=[0.5, 1.0]
    ).eval()
    names = {k.removeprefix("backbone.") for k, _ in net.named_parameters()}
    assert {k for k, _ in plain.named_parameters()} <= names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x))
        net.set_depth(0.5)
        assert not torch.allclose(net(x), plain(x))


def test_private_head_starts_as_the_shared_one_and_trains_one_row_per_depth():
    """model.head: private: at init every depth computes what the shared classifier computes; a depth's loss
    reaches its own row only, and each row trains at the full LR under optim.lr_scale (one depth runs it)."""
    nets = {}
    for head in ("shared", "private"):
        torch.manual_seed(0)
        nets[head] = build_model("resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1, head=head)
    shared, private = nets["shared"], nets["private"]
    fc = private.backbone.fc
    assert isinstance(fc, DepthLinear) and fc.weight.shape == (3, 10, 16) and fc.bias.shape == (3, 10)
    x = torch.randn(4, 1, 16, 16)
    for s in (0.25, 0.5, 1.0):
        with shared.at_depth(s), private.at_depth(s):
            torch.testing.assert_close(private(x), shared(x))
    with private.at_depth(0.5):
        private(x).sum().backward()
    assert fc.weight.grad[1].abs().sum() > 0 and fc.bias.grad[1].abs().sum() > 0
    assert fc.weight.grad[[0, 2]].abs().sum() == 0 and fc.bias.grad[[0, 2]].abs().sum() == 0
    with torch.no_grad():  # a row of its own: changing depth 0.25's row leaves depth 1.0's output as it was
        before = private(x)
        fc.weight[0].add_(1.0)
        torch.testing.assert_close(private(x), before)
    runs = private.runs_per_parameter(dict.fromkeys(private.scaling_factors, 1.0))
    assert runs[id(fc.weight)] == runs[id(fc.bias)] == 1.0
    assert id(shared.backbone.fc.weight) not in shared.runs_per_parameter(dict.fromkeys(shared.scaling_factors, 1.0))
    with pytest.raises(ValueError, match="head must be one of"):
        build_model("resnet32", [0.25, 1.0], width=4, in_channels=1, head="per_depth")


def test_private_bn_rows_train_at_the_full_lr_under_lr_scale():
    """Each row of a private BN affine gets one depth's gradient, so lr_scale does not divide its LR."""
    net = build_model("resnet32", [0.25, 0.5, 1.0], width=4, in_channels=1, bn="private")
    runs = net.runs_per_parameter(dict.fromkeys(net.scaling_factors, 1.0))
    block = net.stages[0][0]  # runs at every depth: its convolution at lr / 3, its private BN rows at lr
    assert runs[id(block.conv1.weight)] == 3.0
    assert runs[id(block.bn1.weight)] == runs[id(block.bn1.bias)] == 1.0
    assert len(net.per_depth_parameters()) == 2 * len(net._norms)
