"""Multinomial logistic regression on cached features: linear-eval's `cached` protocol, and every linear probe of
`simclr compare`. Full-batch L-BFGS on standardised features, so one L2 strength and L-BFGS's fixed step suit any encoder."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_cli.engine.report import NoProgress, Progress, StepStats
from simclr_cli.engine.supervised import LinearClassifier, topk_correct

LBFGS_CHUNK = 65536  # rows of the (N, C) logits held at once while evaluating the full-batch loss


def fit_linear(
    h: Tensor, labels: Tensor, *, num_classes: int, l2: float = 1e-4, max_iter: int = 1000,
    device: torch.device | str = "cpu", progress: Progress | None = None,
) -> tuple[LinearClassifier, dict[str, Any]]:
    """Multinomial logistic regression on standardised features: full-batch L-BFGS (strong Wolfe line search)
    minimising mean cross-entropy + 0.5 * l2 * |W|^2 from a zero start. Returns the classifier (on the CPU)."""
    progress = progress or NoProgress()
    h = h.float()
    mean = h.mean(dim=0)  # (D,)
    std = h.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant (e.g. dead) dimensions stay 0, not inf
    head = LinearClassifier(h.shape[1], num_classes, mean=mean, std=std).to(device)
    x = ((h - mean) / std).to(device)  # (N, D), standardised once rather than in every closure call
    y = labels.to(device)
    n = len(y)
    optimizer = torch.optim.LBFGS(head.fc.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    evaluations = 0

    def objective(*, backward: bool) -> Tensor:
        total = torch.zeros((), device=device)
        for start in range(0, n, LBFGS_CHUNK):  # bounded memory for the (N, C) logits
            logits = head.fc(x[start : start + LBFGS_CHUNK])  # (chunk, C)
            chunk = F.cross_entropy(logits, y[start : start + LBFGS_CHUNK], reduction="sum") / n
            if backward:
                chunk.backward()
            total += chunk.detach()
        penalty = 0.5 * l2 * head.fc.weight.square().sum()  # the bias is not penalised
        if backward:
            penalty.backward()
        return total + penalty.detach()

    def closure() -> Tensor:
        nonlocal evaluations
        optimizer.zero_grad(set_to_none=True)
        loss = objective(backward=True)
        evaluations += 1
        progress.update(StepStats(step=min(evaluations, max_iter), epoch=None, total_steps=max_iter, loss=float(loss),
                                  lr=1.0, images_per_s=0.0))
        return loss

    progress.start(total_steps=max_iter, completed=0, description="linear-eval (L-BFGS)")
    try:
        optimizer.step(closure)
    finally:
        progress.stop()
    state = optimizer.state[head.fc.weight]
    with torch.no_grad():
        final = float(objective(backward=False))
    return head.cpu().eval(), {"loss": final, "iterations": int(state.get("n_iter", 0)), "evaluations": evaluations}


@torch.no_grad()
def accuracy(
    head: LinearClassifier, h: Tensor, labels: Tensor, *, device: torch.device | str = "cpu"
) -> tuple[float, float | None]:
    """(top-1, top-5) of `head` on cached features; top-5 None with fewer than 5 classes."""
    head = head.to(device)
    correct1 = correct5 = 0
    for start in range(0, len(labels), LBFGS_CHUNK):
        logits = head(h[start:start + LBFGS_CHUNK].to(device))  # (chunk, C)
        y = labels[start:start + LBFGS_CHUNK].to(device)
        correct1 += topk_correct(logits, y, 1)
        correct5 += topk_correct(logits, y, 5)
    head.cpu()
    n = len(labels)
    return correct1 / n, (correct5 / n if head.fc.out_features >= 5 else None)


@torch.no_grad()
def predict(head: LinearClassifier, h: Tensor, *, device: torch.device | str = "cpu") -> Tensor:
    """The predicted class (M,) of each row of the features h (M, D), on the CPU."""
    head = head.to(device)
    chunks = [head(h[start:start + LBFGS_CHUNK].to(device)).argmax(dim=1).cpu() for start in range(0, len(h), LBFGS_CHUNK)]
    head.cpu()
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
