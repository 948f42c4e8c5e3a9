"""Loss functions of the cooperative training framework: pure functions, no state.

Notation (docs/design.md, *Losses*): z are logits, T the temperature, y the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE(z, y) = -mean_i log softmax(z_i)[y_i]  (with optional label smoothing), in float32."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, target: Tensor | None = None) -> Tensor:
    """KD(s, t) = T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T)).

    The teacher is detached: the term trains the student only. The T^2 factor keeps the
    gradient scale of the soft term independent of T (Hinton et al. 2015).

    With ``target`` (the labels; ``coop.kd_mask: correct``) a sample counts only where the teacher's
    top class is its label: KD(s, t) = T^2 * (1/B) sum_i [argmax t_i = y_i] KL_i, the mean still over
    the whole batch, so a teacher right everywhere gives the plain term and its wrong answers are
    never copied against the label.
    """
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / t, dim=-1)
    if target is None:
        return t * t * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    per_sample = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    right = (teacher.detach().argmax(-1) == target).float()
    return t * t * (per_sample * right).sum() / student.shape[0]


def sfsl_weights(scaling_factors: Sequence[float], gamma: float) -> dict[float, float]:
    """Scaling-factor-sensitive loss weights of the sub-nets (s < 1).

    w(s) = s^(-gamma) / mean_{s' < 1} s'^(-gamma): shallower sub-nets weigh more, the weights
    average to 1, and gamma = 0 gives uniform weights.
    """
    subs = sorted(s for s in scaling_factors if s < 1.0)
    if not subs:
        return {}
    raw = {s: s ** (-gamma) for s in subs}
    mean = sum(raw.values()) / len(raw)
    return {s: v / mean for s, v in raw.items()}


def kd_ramp(step: int, total_steps: int, warmup: float) -> float:
    """Multiplier of every distillation weight (alpha, beta, self-KD) at optimizer step ``step``.

    ramp(t) = min(1, t / (warmup * total_steps)): 0 at the first step, rising linearly to 1 when
    a fraction ``warmup`` of training is done, 1 after. ``warmup = 0`` is no ramp (always 1).
    At step 0 every teacher is a random net; copying it is noise with the weight of a label.
    """
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"kd warm-up must be a fraction of training in [0, 1], got {warmup}")
    if warmup == 0.0 or total_steps <= 0:
        return 1.0
    return min(1.0, step / (warmup * total_steps))


def gate_penalty(gates: Sequence[Tensor]) -> Tensor:
    """R(g) = sum_b (g_b - 1)^2 over the learned block gates: pulls each gate back toward 1 (identity scale).

    Without it, gates of blocks that only deep sub-nets run can shrink to ~0 (the full net then
    computes what the shallowest sub-net computes).
    """
    if not gates:
        raise ValueError("gate_penalty needs at least one gate (model.gate: learned)")
    return sum(((g.float() - 1.0) ** 2).sum() for g in gates)
