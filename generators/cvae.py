"""The conditional VAE that both generators share (SG-LoRA and ICM-LoRA both sample LoRA weights from one).

Kingma et al., "Semi-supervised learning with deep generative models" (arXiv 1406.5298) / Sohn et al.,
"Learning structured output representation using deep conditional generative models" (NeurIPS 2015):

    encoder  q(z | x, c) = N(mu(x, c), diag(exp(logvar(x, c))))
    decoder  x_hat = g(z, c)
    loss     || x_hat - x ||^2 / m  +  beta * KL(q(z | x, c) || p(z))      (ICM-LoRA's form: MSE + beta KL)

x is an adapter in the coordinates of `ParamSpace` (m <= n - 1 dimensions, unit RMS), never the raw
P-vector (see space.py for why). The condition c is assembled here from what the generators give:

    c = [ tanh(W_r r) (cond_dims),  w (N),  t (1) ]

r (D) is the task's representation (SG-LoRA: its description's embedding; ICM-LoRA: its in-context
task vector), w (N) its similarity profile over the N known tasks (softmax over the top-k cosine
similarities, zero elsewhere; the generators compute it), and t in (0, 1] the training progress of the
vector (step / final step: a training snapshot is an earlier point of the same task's trajectory;
generation asks for t = 1). The projection W_r keeps the condition small: D = 384 raw inputs times a
hidden layer would be most of the network, fitted on five distinct tasks.

Training is a plain full-batch loop with a tqdm progress bar, not Lightning: the data set is ~25
vectors of ~20 numbers that sit in memory as one batch, a fit is ~2,000 AdamW steps taking seconds on
one CPU core, and there is nothing for a Trainer to add (no loader, devices, checkpoints or
validation split); Lightning's start-up alone would cost more than the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from loraplex.catalog import MAX_LR, MAX_STEPS, Options, options
from loraplex.errors import UserInputError
from loraplex.tasks import SEED_MAX


class CVAEConfig(Options):
    """Shape and training of the CVAE (a part of each generator's config)."""

    model_config = options()

    latent_dims: int = Field(4, ge=1, le=64)
    """Dimensions of the latent z."""
    hidden: int = Field(64, ge=4, le=1024)
    """Width of the encoder's and decoder's hidden layers."""
    cond_dims: int = Field(8, ge=1, le=256)
    """Dimensions the task representation is projected to inside the condition."""
    max_dims: int = Field(32, ge=1, le=256)
    """Most coordinates of the parameter space (the basis built from the training vectors)."""
    kl_weight: float = Field(0.01, ge=0, le=1000)
    """beta: weight of the KL term against the reconstruction error."""
    steps: int = Field(2000, ge=1, le=MAX_STEPS)
    """Full-batch optimiser steps."""
    lr: float = Field(3e-3, gt=0, le=MAX_LR)
    """Peak learning rate (AdamW, cosine decay to 10%)."""
    weight_decay: float = Field(1e-3, ge=0, le=1000)
    """AdamW weight decay."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seed of the initialisation and of the reparameterisation noise while fitting."""


class CVAE(nn.Module):
    """q(z | x, c) and g(z, c) over parameter-space coordinates x (B, m)."""

    def __init__(self, x_dims: int, rep_dims: int, n_known: int, cfg: CVAEConfig):
        super().__init__()
        self.x_dims, self.rep_dims, self.n_known = x_dims, rep_dims, n_known
        self.latent = cfg.latent_dims
        c_dims = cfg.cond_dims + n_known + 1
        self.rep_proj = nn.Linear(rep_dims, cfg.cond_dims)
        self.encoder = nn.Sequential(
            nn.Linear(x_dims + c_dims, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.latent_dims))
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dims + c_dims, cfg.hidden), nn.SiLU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, x_dims))

    def condition(self, rep: torch.Tensor, weights: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """rep (B, D), weights (B, N), progress (B,) -> c (B, cond_dims + N + 1)."""
        return torch.cat([torch.tanh(self.rep_proj(rep)), weights, progress.unsqueeze(-1)], dim=-1)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, m), c (B, C) -> mu, logvar (B, Z)."""
        mu, logvar = self.encoder(torch.cat([x, c], dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """z (B, Z), c (B, C) -> x_hat (B, m)."""
        return self.decoder(torch.cat([z, c], dim=-1))

    def forward(self, x, c, noise: torch.Tensor | None = None):
        mu, logvar = self.encode(x, c)
        eps = noise if noise is not None else torch.randn_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z, c), mu, logvar

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def elbo_terms(x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction MSE, KL to N(0, I)), both averaged over the batch. Pure function of tensors."""
    recon = (x_hat - x).pow(2).mean()
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
    return recon, kl


@dataclass
class FitHistory:
    recon: float
    kl: float
    seconds: float
    steps: int


def fit_cvae(model: CVAE, x: torch.Tensor, c_inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             cfg: CVAEConfig, *, progress: bool = True, desc: str = "fitting generator") -> FitHistory:
    """Fit the CVAE on x (n, m) with condition inputs (rep (n, D), weights (n, N), progress (n,))."""
    import time

    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))
    rep, weights, prog = c_inputs
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~25 x 20 matrices: more threads only add synchronisation (10x slower on 2 busy cores)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False, mininterval=0.25)
    try:
        recon, kl = _loop(model, x, rep, weights, prog, cfg, opt, sched, gen, bar)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    if not (math.isfinite(recon.item()) and math.isfinite(kl.item())
            and all(bool(p.isfinite().all()) for p in model.parameters())):
        raise UserInputError(f"the generator's fit diverged (reconstruction error {recon.item():.4g}, KL {kl.item():.4g}) "
                             f"with cvae.lr={cfg.lr:g}, cvae.kl_weight={cfg.kl_weight:g}: lower them; nothing was stored")
    return FitHistory(float(recon.item()), float(kl.item()), time.perf_counter() - t0, cfg.steps)


def _loop(model, x, rep, weights, prog, cfg, opt, sched, gen, bar):
    recon = kl = torch.tensor(0.0)
    for step in bar:
        c = model.condition(rep, weights, prog)  # (n, C)
        noise = torch.randn(x.shape[0], model.latent, generator=gen)
        x_hat, mu, logvar = model(x, c, noise)
        recon, kl = elbo_terms(x, x_hat, mu, logvar)
        loss = recon + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(recon=f"{recon.item():.4f}", kl=f"{kl.item():.3f}")
    return recon, kl
