"""Loss functions of the cooperative training framework: pure functions, no state.

Notation (DESIGN.md section 1): z are logits, T the temperature, y the labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE(z, y) = -mean_i log softmax(z_i)[y_i]  (with optional label smoothing), in float32."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KD(s, t) = T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T)).

    The teacher is detached: the term trains the student only. The T^2 factor keeps the
    gradient scale of the soft term independent of T (Hinton et al. 2015).
    """
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


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
