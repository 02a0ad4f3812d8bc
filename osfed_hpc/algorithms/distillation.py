"""Knowledge-distillation losses shared by the distillation methods (FedDF, single-image FL, ...).

Conventions (Hinton et al. 2015): teacher and student logits are divided by a temperature T and the
divergence is KL(teacher || student) = sum_k p_k (log p_k - log q_k), averaged over the batch
(``reduction="batchmean"``) and multiplied by T^2 so that gradients keep their scale when T changes.
At T = 1 (FedDF's default) the factor is 1 and the loss is exactly FedDF's ``F.kl_div(log_softmax(s),
softmax(t), reduction="batchmean")``.

``soft_targets`` + ``kl_to_targets`` are the same loss with the teacher side precomputed: the mean
over several teachers of KL(teacher_i || student) (FedDF's ``avg_losses``) equals KL to the mean
teacher distribution plus a constant, so a server can fold teachers one at a time into one n x K
target instead of keeping every teacher (see ``TeacherFold``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be positive, got {temperature!r}")


def kl_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of KL(softmax(teacher/T) || softmax(student/T)), times T^2.

    Zero when the student's logits equal the teacher's (up to a per-row constant), positive
    otherwise; the gradient flows to ``student_logits`` only (the teacher is detached)."""
    _check_temperature(temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def soft_targets(teacher_logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, sum_k p_k log p_k) per row for p = softmax(teacher/T): what ``kl_to_targets`` needs.

    Computed in the dtype of ``teacher_logits`` (pass float64 for a fold of many teachers)."""
    _check_temperature(temperature)
    log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    p = log_p.exp()
    # p log p with 0 log 0 = 0 (an underflowed probability contributes nothing)
    neg_entropy = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
    return p, neg_entropy


def kl_to_targets(student_logits: torch.Tensor, target_probs: torch.Tensor, target_neg_entropy: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of sum_k p_k log p_k - sum_k p_k log q_k, times T^2, for q = softmax(student/T).

    With (p, sum p log p) from ``soft_targets`` of one teacher this is ``kl_distillation_loss``; with
    the weighted means of several teachers' (p, sum p log p) it is the weighted mean of their KLs."""
    _check_temperature(temperature)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    cross = (target_probs.to(log_q.dtype) * log_q).sum(dim=1)
    return (target_neg_entropy.to(log_q.dtype) - cross).mean() * temperature**2


class TeacherFold:
    """Folds teachers' logits (n x K each) into the targets of ``kl_to_targets``, one teacher at a time.

    ``avg_losses`` (FedDF's default): the weighted mean over teachers of (p_i, sum p_i log p_i), so
    that the loss is the weighted mean of KL(teacher_i || student). ``avg_logits``: the weighted
    mean of the logits, then its softmax (the loss is KL(softmax(mean logits) || student)). Sums are
    kept in float64 on the CPU: the order of folding is fixed (client id), the result device-free.
    """

    SCHEMES = ("avg_losses", "avg_logits")

    def __init__(self, scheme: str, shape: tuple[int, int], temperature: float = 1.0) -> None:
        if scheme not in self.SCHEMES:
            raise ValueError(f"unknown teacher fold {scheme!r}; choose one of {self.SCHEMES}")
        _check_temperature(temperature)
        self.scheme, self.temperature = scheme, temperature
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.neg_entropy_sum = torch.zeros(shape[0], dtype=torch.float64)
        self.weight = 0.0
        self.count = 0

    def add(self, logits: torch.Tensor, weight: float = 1.0) -> None:
        """Fold one teacher's logits (any float dtype, any device; finite: the caller checks)."""
        logits = logits.detach().to("cpu", torch.float64)
        if self.scheme == "avg_logits":
            self.sum.add_(logits, alpha=weight)
        else:
            p, neg_entropy = soft_targets(logits, self.temperature)
            self.sum.add_(p, alpha=weight)
            self.neg_entropy_sum.add_(neg_entropy, alpha=weight)
        self.weight += weight
        self.count += 1

    def targets(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(probabilities n x K, sum p log p per row), float32 on the CPU; None when nothing was added."""
        if self.count == 0 or self.weight <= 0:
            return None
        mean = self.sum / self.weight
        if self.scheme == "avg_logits":
            p, neg_entropy = soft_targets(mean, self.temperature)
        else:
            p, neg_entropy = mean, self.neg_entropy_sum / self.weight
        return p.float(), neg_entropy.float()
