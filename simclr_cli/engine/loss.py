"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, §2.1, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The paper's loss, the mean of l(i, j) over all 2N anchors (§2.1); the official code returns twice this.

    z1, z2: (N, D) projections of the two views, row i of z1 being the positive of row i of z2.
    Computed in fp32 whatever the input dtype (and outside autocast) so temperature 0.01 stays stable.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent needs z1 and z2 of the same shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"nt_xent needs a batch of at least 2 images (N=1 has no negatives), got N={n}")
    if not temperature > 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D), unit rows: the dot product is sim(u, v)
        logits = z @ z.T / temperature  # (2N, 2N)
        # k != i in the denominator: an anchor is never its own negative.
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        # The positive of view i is view i+N and vice versa; cross_entropy's log-sum-exp keeps tiny temperatures finite.
        targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # (2N,)
        return F.cross_entropy(logits, targets)
