"""The declared interfaces are what their implementations offer: the engines (torch, DeepSpeed) provide
``Engine``, the batch streams (memory, shards) provide ``Batches``, the trackers provide ``Tracker``."""

import ast
import dataclasses
import inspect
import textwrap

import pytest
import torch

from dist_coop.data.batches import Batches
from dist_coop.data.memory import MemoryBatches, Split
from dist_coop.data.stream import ShardBatches
from dist_coop.distributed.engine import DeepSpeedEngine, TorchEngine
from dist_coop.protocols import Engine
from dist_coop.track.base import NullTracker, Tracker
from dist_coop.track.mlflow_tracker import MlflowTracker


def members(protocol: type) -> tuple[set[str], set[str]]:
    """(methods, attributes) a protocol declares."""
    methods = {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}
    methods |= {"__call__", "__len__"} & set(vars(protocol))
    return methods, set(getattr(protocol, "__annotations__", {}))


def declared(cls: type) -> set[str]:
    """What instances of ``cls`` have: methods and class attributes, dataclass fields, and the attributes its
    methods (or its bases' in this package) assign to ``self``."""
    names = {n for klass in cls.__mro__ for n in vars(klass)}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    for klass in cls.__mro__:
        if klass.__module__.startswith("dist_coop."):
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            for node in ast.walk(tree):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            names.add(t.attr)
    return names


@pytest.mark.parametrize("cls", [TorchEngine, DeepSpeedEngine])
def test_engines_provide_the_engine_protocol(cls):
    methods, attributes = members(Engine)
    assert {"backward", "step", "clip_grads", "save", "load", "at_depth", "__call__"} <= methods
    have = declared(cls)
    missing = (methods | attributes) - have
    if cls is DeepSpeedEngine:  # DeepSpeed clips inside its step (norm_before_step = False): never called
        missing.discard("clip_grads")
    assert not missing, f"{cls.__name__} lacks {sorted(missing)}"


def test_batch_streams_provide_the_batches_protocol():
    methods, attributes = members(Batches)
    assert {"epoch", "sharded", "__len__"} <= methods and {"skipped", "mean", "std", "batch_size"} <= attributes
    for cls in (MemoryBatches, ShardBatches):
        assert not (methods | attributes) - declared(cls), cls.__name__
    split = Split(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    memory = MemoryBatches(split, batch_size=4, mean=(0.5,), std=(0.5,), train=True)
    assert memory.skipped == 0 and memory.sharded(1, 2).skipped == 0 and len(memory.sharded(1, 2)) == 1


def test_trackers_provide_the_tracker_protocol():
    methods, attributes = members(Tracker)
    assert attributes == {"run_id", "uri"}
    for cls in (NullTracker, MlflowTracker):
        assert not (methods | attributes) - declared(cls), cls.__name__
