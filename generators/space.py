"""ParamSpace: the low-dimensional coordinates in which the generators' CVAE works.

A flattened minilm adapter has P ~ 150k parameters, and a registry holds tens of them (five experts
with four training snapshots each in the leave-one-out benchmark). A network whose first layer reads
the P-vector would be far larger than the adapters it learns from and fitted by ~25 points. So the
CVAE reads and writes coordinates in the span of its training vectors instead:

    1. normalise per tensor (ICM-LoRA normalises each LoRA tensor): x = (theta - mean) / sigma_g,
       sigma_g the spread of tensor g (`<module>.A` or `<module>.B`) over the training vectors;
    2. take the thin SVD of the normalised training matrix  X (n, P) = U S V^T  and keep the m
       leading right singular vectors (99.9% of the energy, at most `max_dims`, m <= n - 1);
    3. coordinates  c = X V_m / kappa   (n, m), kappa the RMS coordinate (so the CVAE sees unit scale).

`decode(c) = mean + sigma * (kappa c V_m^T)` maps coordinates back to a (P,) vector; on the training
vectors encode/decode is lossless up to the dropped 0.1% of energy (`fit_error`).

Storage: the basis V_m is (m, P), as large as m adapters, so it is not stored. V_m = (U_m / S_m)^T X
is a function of the training vectors, which stay in the registry (a generator lists them as
members and the registry refuses to remove an adapter a component uses). A fitted space stores only
`mix = U_m / S_m` (n, m), the per-tensor scales and kappa, and is rebuilt from the same vectors
(`ParamSpace.rebuild`), which checks that they still give the coordinates it was fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.errors import IntegrityError, InvalidSpec
from loraplex.generators.layout import ParamLayout


def _group_scale(layout: ParamLayout, scales: torch.Tensor) -> torch.Tensor:
    """Expand per-tensor scales (G,) to a per-parameter vector (P,)."""
    lengths = torch.tensor([sl.stop - sl.start for _, sl in layout.groups()])
    return torch.repeat_interleave(scales.to(torch.float64), lengths)  # (P,)


@dataclass
class ParamSpace:
    layout: ParamLayout
    mean: torch.Tensor  # (P,) float64
    sigma: torch.Tensor  # (G,) per-tensor scale
    mix: torch.Tensor  # (n, m): basis = mix^T X
    kappa: float
    basis: torch.Tensor  # (m, P) float64, orthonormal rows
    coords: torch.Tensor  # (n, m) float32, the training vectors' coordinates

    @property
    def dims(self) -> int:
        return int(self.basis.shape[0])

    # ---- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(cls, layout: ParamLayout, vectors: torch.Tensor, *, max_dims: int = 32, energy: float = 0.999) -> "ParamSpace":
        """Build the space from training vectors (n, P)."""
        n = int(vectors.shape[0])
        if n < 2:
            raise InvalidSpec(f"a generator needs at least two training vectors, got {n}")
        theta = vectors.to(torch.float64)  # (n, P)
        mean = theta.mean(0)  # (P,)
        centred = theta - mean
        sigma = torch.stack([centred[:, sl].pow(2).mean().sqrt() for _, sl in layout.groups()])  # (G,)
        sigma = torch.where(sigma > 1e-12, sigma, torch.ones_like(sigma))
        X = centred / _group_scale(layout, sigma)  # (n, P)
        # The left singular vectors and values of X (n << P) from the eigendecomposition of its Gram
        # matrix X X^T (n, n): the same U and S as an SVD of X, at a fraction of the cost (one n x n
        # eigenproblem instead of an SVD of an n x P matrix; 0.2 s instead of 28 s at n=80, P=74k).
        evals, V = torch.linalg.eigh(X @ X.T)  # ascending
        S = evals.flip(0).clamp_min(0).sqrt()  # (n,) descending
        U = _fix_signs(V.flip(1))  # (n, n)
        cum = torch.cumsum(S**2, 0) / (S**2).sum().clamp_min(1e-30)
        keep = int((cum < energy).sum().item()) + 1
        keep = max(1, min(keep, max_dims, int((S > 1e-6 * S[0]).sum().item())))  # above the Gram matrix's round-off
        mix = U[:, :keep] / S[:keep]  # (n, m)
        basis = mix.T @ X  # (m, P)
        raw = X @ basis.T  # (n, m)
        kappa = float(raw.pow(2).mean().sqrt().clamp_min(1e-12))
        return cls(layout, mean, sigma, mix, kappa, basis, (raw / kappa).float())

    @classmethod
    def rebuild(cls, layout: ParamLayout, vectors: torch.Tensor, *, sigma: torch.Tensor, mix: torch.Tensor,
                kappa: float, coords: torch.Tensor, where: str = "generator") -> "ParamSpace":
        """The space a generator was fitted in, from the same training vectors (read back from the registry)."""
        theta = vectors.to(torch.float64)
        if theta.shape[0] != mix.shape[0]:
            raise IntegrityError(f"{where}: fitted on {mix.shape[0]} vectors, found {theta.shape[0]}")
        mean = theta.mean(0)
        X = (theta - mean) / _group_scale(layout, sigma)
        basis = mix.to(torch.float64).T @ X  # (m, P)
        got = (X @ basis.T / kappa).float()  # (n, m)
        if not torch.allclose(got, coords.float(), atol=1e-3, rtol=1e-3):
            raise IntegrityError(f"{where}: its member adapters no longer give the coordinates it was fitted on")
        return cls(layout, mean, sigma.to(torch.float64), mix.to(torch.float64), float(kappa), basis, coords.float())

    # ---- the maps ----------------------------------------------------------------------------
    def param_scale(self) -> torch.Tensor:
        """(P,) float64: each parameter's tensor scale sigma_g (decode multiplies by it)."""
        return _group_scale(self.layout, self.sigma)

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, P) parameter vectors -> (B, m) coordinates."""
        X = (vectors.to(torch.float64) - self.mean) / _group_scale(self.layout, self.sigma)
        return (X @ self.basis.T / self.kappa).float()

    def decode(self, coords: torch.Tensor) -> torch.Tensor:
        """(B, m) coordinates -> (B, P) parameter vectors (float32)."""
        X = (coords.to(torch.float64) * self.kappa) @ self.basis  # (B, P)
        return (self.mean + X * _group_scale(self.layout, self.sigma)).float()

    def fit_error(self, vectors: torch.Tensor) -> float:
        """Relative error ||decode(encode(v)) - v|| / ||v - mean|| over the given vectors."""
        back = self.decode(self.encode(vectors)).to(torch.float64)
        v = vectors.to(torch.float64)
        return float((back - v).norm() / (v - self.mean).norm().clamp_min(1e-30))

    def state(self) -> dict[str, torch.Tensor]:
        return {"space.sigma": self.sigma, "space.mix": self.mix, "space.kappa": torch.tensor([self.kappa], dtype=torch.float64),
                "space.coords": self.coords}

    @classmethod
    def from_state(cls, layout: ParamLayout, vectors: torch.Tensor, tensors: dict, *, where: str) -> "ParamSpace":
        return cls.rebuild(layout, vectors, sigma=tensors["space.sigma"], mix=tensors["space.mix"],
                           kappa=float(tensors["space.kappa"][0]), coords=tensors["space.coords"], where=where)


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    """SVD signs are arbitrary; make each column's largest-magnitude entry positive (deterministic basis)."""
    idx = U.abs().argmax(0)  # (k,)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs
