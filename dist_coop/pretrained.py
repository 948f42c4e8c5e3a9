"""The trained weights a net starts from (``model.init``, ``model.init_leader``): a dist-coop run or checkpoint
folder (``PATH#net``), a plain state dict file (read weights-only), or ``torchvision:<Weights>.<name>``; read as
a plain state dict and converted into the depth-adaptive net by ``dist_coop.models.convert``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from dist_coop.checkpoint import load_checkpoint
from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.models.convert import load_plain_state, plain_state_dict
from dist_coop.run import load_run

TORCHVISION = "torchvision:"


def _run_net(path: Path, net: str, default: str, log: Callable[[str], None]) -> dict[str, Tensor]:
    """The plain state of net ``net`` (or ``default``, else ``teammate_a``) of a run or checkpoint folder."""
    names = [s.name for s in load_run(path, nets=[]).specs]
    want = net or (default if default in names else "teammate_a")
    if want not in names:
        raise ValueError(f"model.init: {path} has no net {want!r}; it holds {sorted(names)}: name one as {path}#<net>")
    run = load_run(path, nets=[want])
    log(f"model.init: {run.checkpoint} net {want} (step {run.step})")
    return plain_state_dict(run.nets[want])


def read_source(spec: str, default_net: str, *, log: Callable[[str], None] = print) -> dict[str, Tensor]:
    """The plain state dict a ``model.init`` value names (``read_source`` of the module docstring's sources):
    a run or checkpoint folder (``PATH#net``: that net; else ``default_net``, or its ``teammate_a`` when it has
    no such net), a state dict file (weights only), or ``torchvision:<Weights enum>.<name>``."""
    if spec.startswith(TORCHVISION):
        try:
            import torchvision
        except Exception as e:  # ImportError, or a broken torchvision/torch pairing
            raise ValueError(f"model.init {spec!r} needs torchvision, which does not import here: {e}") from e
        enum_name, _, member = spec.removeprefix(TORCHVISION).partition(".")
        weights = getattr(getattr(torchvision.models, enum_name, None), member, None)
        if weights is None:
            raise ValueError(f"model.init: {spec!r} is not a torchvision weights name (e.g. ResNet18_Weights.DEFAULT)")
        return dict(weights.get_state_dict(progress=False))
    path_text, _, net = spec.partition("#")
    path = Path(path_text)
    if path.is_dir():
        return _run_net(path, net, default_net, log)
    if not path.is_file():
        raise FileNotFoundError(f"model.init: {path} is neither a run/checkpoint folder nor a state dict file")
    state = load_checkpoint(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"model.init: {path} is not a state dict (name -> tensor); save one with torch.save(net.state_dict())"
        )
    return state


def load_init(net: AdaptiveNet, spec: str, default_net: str, *, log: Callable[[str], None] = print) -> None:
    """Give ``net`` the weights ``spec`` (a ``model.init`` value) names: ``read_source`` then ``load_plain_state``."""
    load_plain_state(net, read_source(spec, default_net, log=log), source=spec, log=log)
