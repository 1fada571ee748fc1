"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, §2.1, eq. 1), and the
distillation loss of SimCLRv2 (Chen et al. 2020b, §2.3, eq. 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_cli.engine import distributed


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The paper's loss, the mean of l(i, j) over all 2N anchors (§2.1); the official code returns twice this.

    z1, z2: (N, D) projections of the two views, row i of z1 being the positive of row i of z2.
    Computed in fp32 whatever the input dtype (and outside autocast) so temperature 0.01 stays stable.
    """
    _check(z1, z2, temperature, processes=1)
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D), unit rows: the dot product is sim(u, v)
        return _contrast(z, z, first=0, temperature=temperature)


def nt_xent_distributed(z1: Tensor, z2: Tensor, temperature: float, *, group=None) -> Tensor:
    """This rank's share of the global-batch NT-Xent: the mean of l(i, j) over its 2n local anchors, each against
    the 2N = 2n * world_size views of ALL ranks (§2.1, "Global BN" and the official cross-replica loss).

    z1, z2: (n, D), this rank's contiguous chunk of the global batch (rank r's row i is global image r*n + i).
    The global mean over all 2N anchors is the mean of the ranks' values, and since `gather_with_grad` returns to
    each rank the gradient of its keys from every rank's loss, DDP's averaging of parameter gradients over ranks
    yields exactly the gradient of that global mean. The gradient w.r.t. this rank's z1, z2 is world_size times the
    global mean's (it is the gradient of the SUM of the ranks' losses), which DDP's 1/world_size cancels.
    With one process this is nt_xent. Computed in fp32 whatever the input dtype.
    """
    processes = distributed.world_size(group)
    _check(z1, z2, temperature, processes=processes)
    n, d = z1.shape
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, D) this rank's anchors
        keys = distributed.gather_with_grad(z, group=group)  # (world_size * 2n, D): rank 0's [z1; z2], rank 1's, ...
        # Reorder to the one-process layout: every rank's z1 in rank order, then every rank's z2.
        keys = keys.view(processes, 2, n, d).transpose(0, 1).reshape(2 * processes * n, d)  # (2N, D)
        return _contrast(z, keys, first=distributed.rank(group) * n, temperature=temperature)


def _check(z1: Tensor, z2: Tensor, temperature: float, *, processes: int) -> None:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs z1 and z2 of the same shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    images = z1.shape[0] * processes
    if images < 2:
        raise ValueError(f"nt_xent needs a batch of at least 2 images (N=1 has no negatives), got N={images}")
    if not temperature > 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")


def _contrast(anchors: Tensor, keys: Tensor, *, first: int, temperature: float) -> Tensor:
    """Mean cross-entropy of anchors (2n, D) = [z1; z2] of images first..first+n-1 against keys (2N, D) = [z1; z2]
    of all N images, every row unit length."""
    n, big_n = anchors.shape[0] // 2, keys.shape[0] // 2
    logits = anchors @ keys.T / temperature  # (2n, 2N)
    own = torch.arange(first, first + n, device=anchors.device)  # (n,) global index of each local image
    # k != i in the denominator: an anchor is never its own negative.
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=anchors.device), torch.cat([own, own + big_n])] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    # The positive of view i is view i+N and vice versa; cross_entropy's log-sum-exp keeps tiny temperatures finite.
    targets = torch.cat([own + big_n, own])  # (2n,)
    return F.cross_entropy(logits, targets)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """SimCLRv2 eq. 2: -sum_y P_T(y|x; tau) log P_S(y|x; tau), both softmaxes at temperature tau, mean over the batch.

    student_logits, teacher_logits: (N, C). The teacher's side carries no gradient; computed in fp32.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"logits must both be (N, C), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(student_logits.device.type, enabled=False):
        targets = F.softmax(teacher_logits.detach().float() / temperature, dim=1)  # (N, C), P_T
        log_probs = F.log_softmax(student_logits.float() / temperature, dim=1)  # (N, C), log P_S
        return -(targets * log_probs).sum(dim=1).mean()


def semi_supervised_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, *,
                                      labelled_logits: Tensor | None = None, labels: Tensor | None = None,
                                      labels_weight: float = 0.0) -> Tensor:
    """SimCLRv2 eq. 3: (1 - a) x the distillation loss on the unlabelled batch + a x the cross-entropy of the labelled
    batch at temperature 1, each a mean over its batch (the paper's alpha is 1 - a). a = 0 is eq. 2 alone.

    labelled_logits: (M, C) student logits of the labelled images; labels: (M,) their classes.
    """
    if not 0 <= labels_weight <= 1:
        raise ValueError(f"labels_weight must be in [0, 1], got {labels_weight}")
    distilled = distillation_loss(student_logits, teacher_logits, temperature)
    if labels_weight == 0:
        return distilled
    if labelled_logits is None or labels is None:
        raise ValueError("labels_weight > 0 needs labelled_logits and labels")
    with torch.autocast(labelled_logits.device.type, enabled=False):
        supervised = F.cross_entropy(labelled_logits.float(), labels)
    return (1 - labels_weight) * distilled + labels_weight * supervised
