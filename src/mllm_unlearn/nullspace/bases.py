"""Frozen LoRA ``A`` bases: the retain null space (NCU) and the random-subspace ablation.

Paper, Sec. 3.2: eigendecompose the retain covariance ``C_l = U_l Lambda_l U_l^T`` with ascending
eigenvalues (Eq. 14), keep the eigenvectors of the ``r`` smallest, ``U_l^perp = U_l[:, 1:r]``
(Eq. 15), and set ``A_l = (U_l^perp)^T`` (Eq. 17). Then ``A_l x ~ 0`` for retain activations, so
the update ``B_l A_l x`` barely touches them (Eq. 18). Sec. 4.3's "CVF + Rand" ablation instead uses
``A_l = Q_l^T`` with ``Q_l`` from the QR factorisation of a Gaussian ``d x r`` matrix.
"""

from __future__ import annotations

import torch


def check_rank(r: int, d: int, layer: str | None = None) -> None:
    """ValueError unless 1 <= r <= d: A (r x d) must have r orthonormal rows (Eq. 16-17)."""
    where = f" of layer {layer}" if layer else ""
    if r < 1:
        raise ValueError(f"rank r={r} must be at least 1{where}")
    if r > d:
        raise ValueError(f"rank r={r} larger than the input width d={d}{where}")


def null_space_basis(cov: torch.Tensor, r: int, *, layer: str | None = None) -> torch.Tensor:
    """``A = (U^perp)^T``, shape (r, d): rows = eigenvectors of the r smallest eigenvalues of ``cov``.

    Eq. 14-15 and 17. ``torch.linalg.eigh`` (ascending eigenvalues) runs in float64 on the CPU
    (no bf16/fp16 kernel; float32 CUDA ``eigh`` can fail on ill-conditioned covariances); the rows
    are orthonormal and returned as float32. ``layer`` only names the layer in errors.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance{f' of layer {layer}' if layer else ''} must be square, got {tuple(cov.shape)}")
    check_rank(r, cov.shape[0], layer)
    _, vectors = torch.linalg.eigh(cov.detach().to("cpu", torch.float64))
    return vectors[:, :r].T.contiguous().to(torch.float32)


def random_basis(d: int, r: int, generator: torch.Generator, *, layer: str | None = None) -> torch.Tensor:
    """``A = Q^T``, shape (r, d), with ``Q R = G`` and ``G`` a d x r standard Gaussian (Sec. 4.3, "Rand").

    Orthonormal rows like :func:`null_space_basis`, but unrelated to the retained knowledge.
    """
    check_rank(r, d, layer)
    gaussian = torch.randn(d, r, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(gaussian)
    return q.T.contiguous().to(torch.float32)


def retain_energy(A: torch.Tensor, cov: torch.Tensor) -> float:
    """Share of retain activation energy that ``A`` lets through: ``||X A^T||_F^2 / ||X||_F^2``.

    With ``C = X^T X / n`` (Eq. 13) this is ``trace(A C A^T) / trace(C)``, computed without ``X``.
    Near 0 for the null-space basis (Eq. 18: ``A x ~ 0`` on retain data); about ``r/d`` for a random
    orthonormal ``A`` on isotropic data.
    """
    a = A.detach().to("cpu", torch.float64)
    c = cov.detach().to("cpu", torch.float64)
    return float(torch.trace(a @ c @ a.T) / torch.trace(c))


def forget_specific_directions(
    cov: torch.Tensor, forget_cov: torch.Tensor, exclude: torch.Tensor, *, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ratios, V)``: the input directions outside ``exclude``'s row span, ranked by how much more of a
    forget request's energy than of the calibration set's they carry.

    ``ratios`` (descending) are the generalised eigenvalues ``v^T F v / v^T C v`` of the forget covariance
    ``F`` against the calibration covariance ``C`` (Eq. 13 on each set), over the orthogonal complement of
    ``exclude`` (e.g. the null basis, shape (r, d)); ``V``'s rows are the matching directions, unit length,
    in input space. A direction of ratio k reaches a calibration input with 1/k of its reach on a forget
    input (in mean square). Not in the paper: the optional request-dependent part of A
    (:attr:`NCUConfig.forget_directions`) and ``scripts/relearn_route.py``'s diagnostic use it.
    """
    where = f" of layer {layer}" if layer else ""
    d = cov.shape[0]
    if tuple(cov.shape) != (d, d) or tuple(forget_cov.shape) != (d, d) or exclude.shape[-1] != d:
        raise ValueError(
            f"covariances{where} must both be d x d with exclude's rows of width d, got "
            f"{tuple(cov.shape)}, {tuple(forget_cov.shape)} and {tuple(exclude.shape)}"
        )
    e = exclude.detach().to("cpu", torch.float64).reshape(-1, d)
    values, vectors = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - e.T @ e)
    outside = vectors[:, values > 0.5]  # orthonormal basis (d x (d - r)) of the complement of exclude's rows
    c = outside.T @ cov.detach().to("cpu", torch.float64) @ outside
    f = outside.T @ forget_cov.detach().to("cpu", torch.float64) @ outside
    lam, u = torch.linalg.eigh(c)
    whiten = u / lam.clamp_min(1e-12 * float(lam.max().clamp_min(1e-300))).sqrt()  # whiten.T @ c @ whiten = I
    ratios, w = torch.linalg.eigh(whiten.T @ f @ whiten)
    directions = (outside @ whiten @ w).flip(1).T
    return ratios.flip(0), directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
