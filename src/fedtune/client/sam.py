"""Sharpness-aware minimization (SAM; Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware
Minimization for Efficiently Improving Generalization", arXiv:2010.01412), a step option of local
training (`train.sam_rho`):

    g   = grad L(w)                      on the step's micro-batches
    e   = rho * g / ||g||                ||g||: all trained parameters as one vector
    g'  = grad L(w + e)                  on the same micro-batches
    w  <- optimizer step with g' at w    (w + e is only where the gradient is taken)

DFedSAM (Shi et al., arXiv:2302.04083) runs these steps locally before each gossip round; any
first-order strategy may use them. One SAM step costs two forward-backward passes.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # keeps rho * g / ||g|| finite at a zero gradient (then e = 0)


@torch.no_grad()
def sam_perturb_(params: list[torch.nn.Parameter], rho: float) -> list[torch.Tensor]:
    """Move each parameter to w + rho * g / ||g|| (g: its .grad, ||g||: the joint L2 norm over
    `params`; a parameter without a gradient stays) and return the perturbations e, to undo."""
    grads = [p.grad for p in params]
    squares = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
    scale = rho / (squares**0.5 + EPS)
    out = []
    for p, g in zip(params, grads):
        e = torch.zeros_like(p) if g is None else g * scale
        p.add_(e)
        out.append(e)
    return out


@torch.no_grad()
def sam_restore_(params: list[torch.nn.Parameter], perturbations: list[torch.Tensor]) -> None:
    """Back to w from w + e (the gradients, taken at w + e, are kept for the optimizer step)."""
    for p, e in zip(params, perturbations):
        p.sub_(e)
