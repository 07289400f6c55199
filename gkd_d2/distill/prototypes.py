"""Prototype selection of the PGM: density filter and joint matching pursuit, per (class, level).

The official code (hikvision-research/DAVAR-Lab-ML,
ECCV22_Distilling_Object_Detectors_with_Global_Knowledge) runs the pursuit in fp16 and builds
K x C x N reconstructions; here all math is in fp32 and the pursuit keeps only K x N
correlations (the closed-form score), which picks the same atoms in O(K N) memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def density_scores(x_hat: torch.Tensor, kernel: float = 0.1) -> torch.Tensor:
    """Density of each instance among all: rho_i = sum_j exp(-((1 - cos_ij) / kernel)^2).

    Args:
        x_hat: (N, C) L2-normalised features of one space.
        kernel: width of the Gaussian kernel on cosine distance.

    Returns:
        (N,) densities; the sum includes j = i.
    """
    dist = 1.0 - x_hat @ x_hat.T
    return torch.exp(-((dist / kernel) ** 2)).sum(dim=1)


def dense_candidates(
    xs_hat: torch.Tensor, xt_hat: torch.Tensor, kernel: float = 0.1, quantile: float = 0.4
) -> torch.Tensor:
    """Instances dense in both spaces: rho > the value at sorted index floor(q * N), strictly.

    Args:
        xs_hat, xt_hat: (N, C_S), (N, C_T) L2-normalised student / teacher features.

    Returns:
        (N,) bool mask of the candidate atoms.
    """
    n = xs_hat.shape[0]
    k = min(int(math.floor(quantile * n)), n - 1)
    keep = torch.ones(n, dtype=torch.bool, device=xs_hat.device)
    for x_hat in (xs_hat, xt_hat):
        rho = density_scores(x_hat, kernel)
        keep &= rho > torch.sort(rho).values[k]
    return keep


def joint_coefficients(
    u_s: torch.Tensor, u_t: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form minimiser of ||r_S - g_S w_S||^2 + ||r_T - g_T w_T||^2 + alpha (w_S - w_T)^2.

    For unit-norm atoms g and correlations u = g^T r (any shape, elementwise):
    w_S = ((1 + a) u_S + a u_T) / (1 + 2a), and symmetrically for w_T.
    """
    w_s = ((1 + alpha) * u_s + alpha * u_t) / (1 + 2 * alpha)
    w_t = ((1 + alpha) * u_t + alpha * u_s) / (1 + 2 * alpha)
    return w_s, w_t


def joint_matching_pursuit(
    xs_hat: torch.Tensor,
    xt_hat: torch.Tensor,
    candidates: torch.Tensor,
    num_atoms: int,
    alpha: float = 10.0,
    exclude_picked: bool = False,
) -> torch.Tensor:
    """Pick atoms among ``candidates`` that jointly reconstruct all N instances in both spaces.

    Plain matching pursuit (no refit of earlier coefficients). At each step the candidate k with
    the largest sum_n (u_S w_S + u_T w_T) is picked, i.e. the smallest joint objective, and the
    residuals lose its contribution. Only the correlations u = G R (K x N) are kept and updated
    by rank-1 steps, u <- u - (G g_k) w_k^T: O(K * N) memory, never K x C x N.

    Args:
        xs_hat, xt_hat: (N, C_S), (N, C_T) L2-normalised features (the initial residuals).
        candidates: (K,) int64 indices of the instances allowed as atoms.
        num_atoms: M, the number of picks.
        alpha: coupling weight of the coefficients of the two spaces.
        exclude_picked: never pick an atom twice (the official code may).

    Returns:
        (M',) int64 instance indices of the picks, in pick order (M' = M, or fewer when
        ``exclude_picked`` runs out of candidates).
    """
    g_s, g_t = xs_hat[candidates], xt_hat[candidates]  # (K, C)
    u_s, u_t = g_s @ xs_hat.T, g_t @ xt_hat.T  # (K, N)
    gram_s, gram_t = g_s @ g_s.T, g_t @ g_t.T  # (K, K)
    available = torch.ones(len(candidates), dtype=torch.bool, device=xs_hat.device)
    picks = []
    for _ in range(num_atoms):
        w_s, w_t = joint_coefficients(u_s, u_t, alpha)
        score = (u_s * w_s + u_t * w_t).sum(dim=1)
        if exclude_picked:
            if not available.any():
                break
            score = score.masked_fill(~available, float("-inf"))
        k = int(torch.argmax(score))
        picks.append(k)
        available[k] = False
        u_s = u_s - torch.outer(gram_s[:, k], w_s[k])
        u_t = u_t - torch.outer(gram_t[:, k], w_t[k])
    return candidates[torch.tensor(picks, dtype=torch.long, device=candidates.device)]


def select_prototypes(
    feats_s: torch.Tensor,
    feats_t: torch.Tensor,
    num_prototypes: int = 10,
    alpha: float = 10.0,
    kernel: float = 0.1,
    quantile: float = 0.4,
    exclude_picked: bool = False,
) -> torch.Tensor:
    """Indices of the prototypes of one (class, level) from its instances' pooled features.

    Density filter in both spaces, then joint matching pursuit over all instances. Fallbacks:
    no instance gives no prototype; N <= M instances are all taken; an empty candidate set
    (possible for small N) falls back to all instances as candidates.

    Args:
        feats_s, feats_t: (N, C_S), (N, C_T) raw (un-normalised) pooled student / teacher
            features of the same N instances.

    Returns:
        (M',) int64 indices into the N instances, M' = min(M, N).
    """
    if feats_s.shape[0] != feats_t.shape[0]:
        raise ValueError(
            f"student and teacher features describe different instances: "
            f"{feats_s.shape[0]} vs {feats_t.shape[0]} rows"
        )
    n = feats_s.shape[0]
    device = feats_s.device
    if n <= num_prototypes:
        return torch.arange(n, device=device)
    xs_hat = F.normalize(feats_s.float(), dim=1)
    xt_hat = F.normalize(feats_t.float(), dim=1)
    keep = dense_candidates(xs_hat, xt_hat, kernel, quantile)
    candidates = torch.nonzero(keep).flatten()
    if candidates.numel() == 0:
        candidates = torch.arange(n, device=device)
    return joint_matching_pursuit(
        xs_hat, xt_hat, candidates, num_prototypes, alpha, exclude_picked=exclude_picked
    )
