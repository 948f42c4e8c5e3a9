"""Cooperative tasks: given the nets and a batch, return the named loss terms.

The training loop only sums and backpropagates what a task returns (timm's distillation-task
habit): no loss term and no ablation flag lives in the loop. Every term is already weighted, so
a net's loss is the sum of the terms under its name (``"teammate_a/kd_peer@0.25"``...). Teachers
are always detached logits of the *same* forward (one forward per net and sub-net per step), so
each net's loss touches only its own parameters.

What several depths of a net compute alike is computed once (``DepthForward``; ``model.share_prefix``).
``backward_local`` backpropagates each net's loss part by part as soon as a part is known (a net's
full-depth terms, each sub-net's terms) instead of returning the terms for one summed backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dist_coop.choices import TASKS
from dist_coop.config import CoopConfig, ModelConfig
from dist_coop.coop.forward import DepthForward
from dist_coop.coop.losses import cross_entropy, gate_penalty, kd_loss, kd_ramp, sfsl_weights
from dist_coop.models.adaptive import AdaptiveNet
from dist_coop.models.registry import build_from_config

LEADER, TEAMMATE_A, TEAMMATE_B = "leader", "teammate_a", "teammate_b"
Exchange = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
Backward = Callable[[str, Tensor, bool], None]  # (net name, a part of its loss, last part of the step?)


def term_name(net: str, term: str, s: float) -> str:
    return f"{net}/{term}@{s}"


@dataclass(frozen=True)
class NetSpec:
    """One net the task trains: its name, whether it is the Leader, the depths it is evaluated at."""

    name: str
    leader: bool  # built with model.leader_width
    eval_depths: tuple[float, ...]
    train_depth: float = 1.0  # the depth whose logits are this net's soft targets
    role: str = ""  # metric name prefix; "" = name
    trained_depths: tuple[float, ...] = (1.0,)  # depths with a loss term (others are only truncated)
    depth_weights: tuple[float, ...] = ()  # their loss weights (SFSL w(s) of the sub-nets, 1 at full depth); () = all 1

    def build(self, model: ModelConfig, scaling_factors: Sequence[float]) -> AdaptiveNet:
        """This net, built from ``model`` (the Leader's backbone and width for the Leader)."""
        return build_from_config(model, scaling_factors, leader=self.leader, trained=self.trained_depths)

    def trained_weights(self) -> dict[float, float]:
        """``depth -> loss weight`` of the trained depths (``optim.lr_scale: weighted`` reads it)."""
        return dict(zip(self.trained_depths, self.depth_weights or (1.0,) * len(self.trained_depths), strict=True))

    def metric(self, s: float) -> str:
        """``teammate_a@0.25``: how depth ``s`` of this net is named in metrics."""
        return f"{self.role or self.name}@{s}"


class CooperativeTask:
    """Leader + one or two Teammates with self-, interactive and guided learning (docs/design.md, *Losses*)."""

    def __init__(self, coop: CoopConfig, *, label_smoothing: float = 0.0) -> None:
        self.cfg = coop
        self.label_smoothing = label_smoothing
        self.factors = tuple(sorted(coop.scaling_factors))
        self.sub_factors = tuple(s for s in self.factors if s < 1.0) if coop.sub_nets else ()
        self.weights = sfsl_weights(self.sub_factors, coop.gamma)
        # nets that only give soft targets (coop.leader_mode: frozen): no loss terms, no backward
        self.frozen = {LEADER} if coop.leader and coop.leader_mode == "frozen" else set()
        self.kd_scale = 1.0  # the distillation ramp at the current step (set_progress)
        self.peer_scale = 1.0  # the ramp of the interactive (peer KD) terms
        teammates = (TEAMMATE_A, TEAMMATE_B)[: coop.teammates]
        trained = (*self.sub_factors, 1.0)
        self.specs = ([NetSpec(LEADER, True, self.factors)] if coop.leader else []) + [
            NetSpec(name, False, self.factors, trained_depths=trained, depth_weights=(*self.weights.values(), 1.0))
            for name in teammates
        ]

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by the loop before each step: distillation weights ramp in over ``coop.kd_warmup``."""
        self.kd_scale = kd_ramp(step, total_steps, self.cfg.kd_warmup)
        self.peer_scale = kd_ramp(step, total_steps, self.cfg.peer_warmup)

    def peer(self, name: str) -> str | None:
        if self.cfg.teammates < 2:
            return None
        return {TEAMMATE_A: TEAMMATE_B, TEAMMATE_B: TEAMMATE_A}.get(name)

    def sub_depths(self, name: str) -> tuple[float, ...]:
        """The sub-net depths (s < 1) with loss terms of net ``name``."""
        return () if name == LEADER or self._sub_terms_per_depth(name) == 0 else self.sub_factors

    def teachers(self, name: str) -> set[str]:
        """The nets whose soft targets (detached full logits) net ``name``'s terms read, its own included."""
        c = self.cfg
        if name == LEADER:
            return {s.name for s in self.specs if s.name != LEADER} if c.leader_kd > 0 and not self.frozen else set()
        peer = self.peer(name)
        guide = {LEADER} if c.leader and c.beta > 0 else set()
        return {name} | ({peer} if peer is not None and c.alpha > 0 else set()) | guide

    def net_terms(
        self,
        name: str,
        net: AdaptiveNet,
        z: Tensor,
        logits: Callable[[float], Tensor],
        y: Tensor,
        soft: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """Loss terms of net ``name``; ``z`` its full-depth logits, ``logits(s)`` its logits at depth s (the only
        forward of that sub-net this step), ``soft`` every net's detached full logits.

        With r the distillation ramp (``kd_ramp``, 1 after ``coop.kd_warmup``) and p that of the
        peer terms (1 after ``coop.peer_warmup``):
        Leader:            CE(z_L, y) + r * leader_kd * KD(z_L, mean(z_A, z_B))
        Teammate X, s=1:   CE(z_X, y) + p * alpha * KD(z_X, z_Y) + r * beta * KD(z_X, z_L)
        Teammate X, s<1:   w(s) * [CE(z_X^s, y) (unless coop.sub_ce: false, in-place distillation)
                                   + r * KD(z_X^s, z_X) + p * alpha * KD(z_X^s, z_Y)
                                   (+ r * beta * KD(z_X^s, z_L) with coop.sub_guided)]
        Every net with learned gates (coop.gate_reg > 0): + gate_reg * sum_b (g_b - 1)^2.
        With ``coop.kd_mask: correct`` each KD term counts only the samples its teacher classifies correctly.
        With ``coop.kd_norm`` each depth's CE and KD terms are divided by the sum of their current
        weights (1 + r * alpha + r * beta at s = 1; the bracket's weights at s < 1, w(s) kept), so a
        depth's gradient is that of one CE term toward a convex mix of the label and its teachers.
        """
        terms = self.full_terms(name, net, z, y, soft)
        for s in self.sub_depths(name):
            terms.update(self.sub_terms(name, s, logits(s), y, soft))
        return terms

    def full_terms(
        self, name: str, net: AdaptiveNet, z: Tensor, y: Tensor, soft: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Net ``name``'s terms at s = 1 (``net_terms``), ``z`` its full-depth logits; none for a frozen net."""
        if name in self.frozen:
            return {}
        c, t, r, p = self.cfg, self.cfg.temperature, self.kd_scale, self.peer_scale
        m = y if c.kd_mask == "correct" else None  # KD only where the teacher is right
        terms = {term_name(name, "ce", 1.0): cross_entropy(z, y, self.label_smoothing)}
        if c.gate_reg > 0:
            gates = [g for stage in net.stage_gates() for g in stage]
            if gates:
                terms[term_name(name, "gate_reg", 1.0)] = c.gate_reg * gate_penalty(gates)
        if name == LEADER:
            teammates = [soft[n] for n in (TEAMMATE_A, TEAMMATE_B) if n in soft]
            if c.leader_kd > 0 and teammates:
                terms[term_name(name, "kd_team", 1.0)] = (
                    r * c.leader_kd * kd_loss(z, torch.stack(teammates).mean(0), t, m)
                )
            return self._normalised(name, terms) if c.kd_norm else terms
        peer = self.peer(name)
        if peer is not None and c.alpha > 0:
            terms[term_name(name, "kd_peer", 1.0)] = p * c.alpha * kd_loss(z, soft[peer], t, m)
        if c.leader and c.beta > 0:
            terms[term_name(name, "kd_leader", 1.0)] = r * c.beta * kd_loss(z, soft[LEADER], t, m)
        return self._normalised(name, terms) if c.kd_norm else terms

    def sub_terms(self, name: str, s: float, zs: Tensor, y: Tensor, soft: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Teammate ``name``'s terms at depth s < 1 (``net_terms``), ``zs`` its logits there."""
        c, t, r, p = self.cfg, self.cfg.temperature, self.kd_scale, self.peer_scale
        m = y if c.kd_mask == "correct" else None
        peer, w = self.peer(name), self.weights[s]
        terms: dict[str, Tensor] = {}
        if c.sub_ce:
            terms[term_name(name, "ce", s)] = w * cross_entropy(zs, y, self.label_smoothing)
        if c.self_kd:
            terms[term_name(name, "kd_self", s)] = w * r * kd_loss(zs, soft[name], t, m)
        if peer is not None and c.alpha > 0:
            terms[term_name(name, "kd_peer", s)] = w * p * c.alpha * kd_loss(zs, soft[peer], t, m)
        if c.sub_guided and c.leader and c.beta > 0:
            terms[term_name(name, "kd_leader", s)] = w * r * c.beta * kd_loss(zs, soft[LEADER], t, m)
        return self._normalised(name, terms) if c.kd_norm else terms

    def depth_weight_sum(self, name: str, s: float) -> float:
        """Sum of the current (ramped) weights of net ``name``'s CE and KD terms at depth ``s``, w(s) excluded."""
        c, r = self.cfg, self.kd_scale
        peer = self.peer_scale * c.alpha if self.peer(name) is not None else 0.0
        if name == LEADER:
            has_team = c.teammates > 0 and c.leader_kd > 0
            return 1.0 + (r * c.leader_kd if has_team else 0.0)
        if s == 1.0:
            return 1.0 + peer + (r * c.beta if c.leader else 0.0)
        guided = r * c.beta if (c.sub_guided and c.leader) else 0.0
        return float(c.sub_ce) + (r if c.self_kd else 0.0) + peer + guided

    def _normalised(self, name: str, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for key, value in terms.items():
            term, s = key.split("/", 1)[1].split("@")
            total = self.depth_weight_sum(name, float(s))
            out[key] = value if term == "gate_reg" or total <= 0 else value / total
        return out

    def num_terms(self, name: str) -> int:
        """How many loss terms net ``name`` sums (scales its clipping threshold with ``optim.clip_scale: terms``)."""
        c = self.cfg
        if name == LEADER:
            return 1 + int(c.leader_kd > 0 and c.teammates > 0)
        peer = int(self.peer(name) is not None and c.alpha > 0)
        guided = int(c.leader and c.beta > 0)
        return 1 + peer + guided + self._sub_terms_per_depth(name) * len(self.sub_factors)

    def _sub_terms_per_depth(self, name: str) -> int:
        c = self.cfg
        peer = int(self.peer(name) is not None and c.alpha > 0)
        return int(c.sub_ce) + int(c.self_kd) + peer + int(c.sub_guided and c.leader and c.beta > 0)

    def depths(self, name: str) -> tuple[float, ...]:
        """The depths net ``name`` runs each step, the full one first."""
        return (1.0, *self.sub_depths(name))

    def local_terms(
        self, nets: Mapping[str, AdaptiveNet], x: Tensor, y: Tensor, exchange: Exchange
    ) -> dict[str, Tensor]:
        """The terms of the nets on this rank: their full forwards, the exchange of soft targets, their terms.

        ``exchange`` maps this rank's detached full-depth logits to every net's (the identity
        when all nets are local; an all-gather in the split placement).
        """
        forwards = {name: DepthForward(net, x, self.depths(name)) for name, net in nets.items()}
        full = {name: fw(1.0) for name, fw in forwards.items()}
        soft = exchange({name: z.detach() for name, z in full.items()})
        terms: dict[str, Tensor] = {}
        for name, net in nets.items():
            terms.update(self.net_terms(name, net, full[name], forwards[name], y, soft))
        return terms

    def backward_local(
        self, nets: Mapping[str, AdaptiveNet], x: Tensor, y: Tensor, exchange: Exchange, backward: Backward
    ) -> dict[str, Tensor]:
        """``local_terms``, each net's loss backpropagated part by part as soon as the part is known.

        Teachers are detached, so a net's loss is a sum of independent parts: its full-depth terms and
        each sub-net's terms. ``backward(name, part, last)`` backpropagates one part into net ``name``'s
        gradients, which accumulate (``last``: the net's final backward of this step); the gradients
        equal those of one backward of the summed terms. A net's full-depth part waits until the soft
        targets it reads are known (on this rank, or from ``exchange``, called once as in
        ``local_terms``); then every ready net's full-depth part goes first, then each sub-net's forward
        and part in turn, then the shared part of its depths (``DepthForward.trunk_loss``). So besides
        the shared parts, only the full-depth graphs waiting for soft targets and one sub-net's graph
        are alive at a time. Returns every term's detached value.
        """
        forwards: dict[str, DepthForward] = {}
        full: dict[str, Tensor] = {}  # full-depth logits whose part is not backpropagated yet
        soft: dict[str, Tensor] = {}
        values: dict[str, Tensor] = {}

        def part(name: str, terms: dict[str, Tensor], last: bool) -> None:
            values.update({key: value.detach() for key, value in terms.items()})
            backward(name, forwards[name].scaled(sum(terms.values())), last)

        def finish(ready: list[str]) -> None:
            for name in [n for n in ready if n in self.frozen]:  # soft targets only: nothing to backpropagate
                del full[name], forwards[name]
            ready = [n for n in ready if n not in self.frozen]
            for name in ready:  # the full-depth graphs first: the largest
                last = not (self.sub_depths(name) or forwards[name].detach)
                part(name, self.full_terms(name, nets[name], full.pop(name), y, soft), last)
            for name in ready:
                fw, subs = forwards[name], self.sub_depths(name)
                for i, s in enumerate(subs):
                    part(name, self.sub_terms(name, s, fw(s), y, soft), i == len(subs) - 1 and not fw.detach)
                if fw.detach:
                    backward(name, fw.trunk_loss(), True)
                del forwards[name]  # the net is done: its shared activations and their gradients go

        for name, net in nets.items():
            forwards[name] = DepthForward(net, x, self.depths(name), detach=True)
            full[name] = forwards[name](1.0)
            soft[name] = full[name].detach()
            finish([n for n in full if self.teachers(n) <= soft.keys()])
        for name, z in exchange({name: soft[name] for name in nets}).items():
            soft.setdefault(name, z)  # this rank's own stay as they are (the exchange returns the same values)
        finish(list(full))
        return values

    def __call__(self, nets: Mapping[str, AdaptiveNet], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """All nets in this process (the colocated placement)."""
        return self.local_terms({spec.name: nets[spec.name] for spec in self.specs}, x, y, dict)


class IndependentTask:
    """The baseline a user would otherwise run: one separate net per depth, each trained with CE at its depth."""

    kd_scale = 0.0  # nothing is distilled

    def __init__(self, coop: CoopConfig, *, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing
        self.specs = [
            NetSpec(f"independent_{s}", False, (s,), s, "independent", (s,)) for s in sorted(coop.scaling_factors)
        ]

    def set_progress(self, step: int, total_steps: int) -> None:
        """Nothing is distilled: no schedule."""

    def num_terms(self, name: str) -> int:
        return 1

    def local_terms(
        self, nets: Mapping[str, AdaptiveNet], x: Tensor, y: Tensor, exchange: Exchange
    ) -> dict[str, Tensor]:
        """Independent nets exchange nothing."""
        return self(nets, x, y)

    def backward_local(
        self, nets: Mapping[str, AdaptiveNet], x: Tensor, y: Tensor, exchange: Exchange, backward: Backward
    ) -> dict[str, Tensor]:
        """``CooperativeTask.backward_local``: each net's one term is its one part, backpropagated after its forward."""
        values = {}
        for name, net in nets.items():
            for key, value in self({name: net}, x, y).items():
                backward(name, value, True)
                values[key] = value.detach()
        return values

    def __call__(self, nets: Mapping[str, AdaptiveNet], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        terms = {}
        for spec in self.specs:
            if spec.name not in nets:
                continue
            net = nets[spec.name]
            with net.at_depth(spec.train_depth):
                logits = net(x)
            terms[term_name(spec.name, "ce", spec.train_depth)] = cross_entropy(logits, y, self.label_smoothing)
        return terms


def build_task(coop: CoopConfig, *, label_smoothing: float = 0.0) -> CooperativeTask | IndependentTask:
    """The task ``coop.task`` names (``choices.TASKS``): ``independent`` or ``cooperative``."""
    if coop.task not in TASKS:
        raise ValueError(f"coop.task must be one of {list(TASKS)}, got {coop.task!r}")
    task = IndependentTask if coop.task == "independent" else CooperativeTask
    return task(coop, label_smoothing=label_smoothing)


def net_of(term: str) -> str:
    """The net a term belongs to: ``"teammate_a/kd_peer@0.25"`` -> ``"teammate_a"``."""
    return term.split("/", 1)[0]
