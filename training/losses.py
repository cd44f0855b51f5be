"""The training loss: cross-entropy on hard labels, plus a distillation term on soft targets (train.distill).

Per row, with p_T = softmax(logits / T) and q the soft target (a teacher's out-of-fold probabilities, or a
pseudo-label):

    hard and soft:  (1 - alpha) * CE(label) + alpha * soft_term
    hard only:      CE(label)            (no soft target: data.soft_labels_missing=hard)
    soft only:      soft_term            (a pseudo-labelled row has no hard label; alpha does not weigh it)
    soft_term = T^2 * KL(q || p_T)  [+ (1 - cos(p_T, q)) when cosine]

T^2 keeps the gradient scale of the KL term independent of T (Hinton et al.); the cosine term (1st place LMSYS
added it to CE + KL) is left unscaled: it is bounded in [0, 1] and its gradient already vanishes with T. Rows are
summed; the caller divides by its denominator (training/inputs.micro_batches) so every example weighs the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None = None,
                 soft_mask: torch.Tensor | None = None, *, alpha: float = 0.0, temperature: float = 1.0,
                 cosine: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed loss of a batch. labels (N,) with -1 where a row has no hard label; soft (N, 3) targets, used where
    soft_mask (N,) is True. Without soft targets in the batch and alpha=0 it IS F.cross_entropy (bit for bit)."""
    logits = logits.float()
    has_hard = labels >= 0
    has_soft = torch.zeros_like(has_hard) if soft_mask is None else soft_mask.bool()
    if not bool((has_hard | has_soft).all()):
        raise ValueError("a training row has neither a hard label nor a soft target")
    if bool(has_hard.all()) and (alpha == 0.0 or not bool(has_soft.any())):
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing)
    ce = torch.where(has_hard, ce, torch.zeros_like(ce))
    term = soft_term(logits, soft.float(), temperature, cosine)
    term = torch.where(has_soft, term, torch.zeros_like(term))
    w_soft = torch.where(has_hard, torch.full_like(ce, alpha), torch.ones_like(ce)) * has_soft
    w_hard = 1.0 - w_soft  # hard only: 1; both: 1 - alpha; soft only: 0 (ce is 0 there anyway)
    return (w_hard * ce + w_soft * term).sum()


def soft_term(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, cosine: bool = False) -> torch.Tensor:
    """Per-row T^2 * KL(target || softmax(logits / T)) (+ 1 - cosine similarity of the two when cosine)."""
    logp = F.log_softmax(logits / temperature, dim=-1)
    kl = F.kl_div(logp, target, reduction="none").sum(-1) * temperature ** 2  # 0 * log 0 counts as 0
    if cosine:
        kl = kl + (1.0 - F.cosine_similarity(logp.exp(), target, dim=-1))
    return kl
