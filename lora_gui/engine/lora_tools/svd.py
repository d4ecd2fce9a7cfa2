"""Low-rank factorisation by SVD, and the rank rules of kohya-ss/sd-scripts ``networks/resize_lora.py``.

For singular values S (descending) the dynamic methods choose the new rank as:

* ``sv_ratio`` p:      keep every S_i > S_0 / p (so S_0 / S_last <= p);
* ``sv_cumulative`` p: the smallest k with sum(S[:k]) / sum(S) >= p;
* ``sv_fro`` p:        the smallest k with sqrt(sum(S[:k]^2) / sum(S^2)) >= p;

each capped at the requested (maximum) rank and at least 1; an all-zero matrix gets rank 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
MIN_SV = 1e-6  # below this the matrix is treated as zero (sd-scripts' MIN_SV)


@dataclass(frozen=True)
class RankChoice:
    rank: int
    sum_retained: float  # sum(S[:rank]) / sum(S)
    fro_retained: float  # sqrt(sum(S[:rank]^2) / sum(S^2)): the kept "energy" (Frobenius norm)
    max_ratio: float  # S_0 / S_{rank-1}


def check_method(method: str | None, param: float | None) -> None:
    """A sentence for a bad dynamic method or parameter (the field names are the CLI's and the page's)."""
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"dynamic_method must be one of {', '.join(DYNAMIC_METHODS)}, got {method!r}.")
    if param is None:
        raise ValueError(f"dynamic_method {method} needs dynamic_param: set it.")
    if method == "sv_ratio" and param < 1:
        raise ValueError(f"dynamic_param for sv_ratio is a ratio S_max / S_min of at least 1, got {param}.")
    if method != "sv_ratio" and not 0 < param <= 1:
        raise ValueError(f"dynamic_param for {method} is a fraction in (0, 1], got {param}.")


def _dynamic_index(s: torch.Tensor, method: str, param: float) -> int:
    """The 0-based index of the last kept singular value (before capping), as sd-scripts counts."""
    if method == "sv_ratio":
        return int((s > s[0] / param).sum().item()) - 1
    if method == "sv_cumulative":
        fractions = torch.cumsum(s, 0) / s.sum()
        return int(torch.searchsorted(fractions, torch.tensor(param, dtype=s.dtype)).item())
    squares = s.pow(2)
    fractions = torch.cumsum(squares, 0) / squares.sum()
    return int(torch.searchsorted(fractions, torch.tensor(param**2, dtype=s.dtype)).item())


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> RankChoice:
    """The new rank for singular values ``s`` (descending, float64 preferred) and what it keeps."""
    s = s.double()
    if s[0] <= MIN_SV:
        rank = 1
    elif method is None:
        rank = max_rank
    else:
        rank = max(0, min(_dynamic_index(s, method, param), len(s) - 1)) + 1
    rank = max(1, min(rank, max_rank, len(s)))
    total, squares = s.sum(), s.pow(2).sum()
    kept_sum = float(s[:rank].sum() / total) if total > 0 else 1.0
    kept_fro = float((s[:rank].pow(2).sum() / squares).sqrt()) if squares > 0 else 1.0
    ratio = float(s[0] / s[rank - 1]) if s[rank - 1] > 0 else float("inf")
    return RankChoice(rank, kept_sum, kept_fro, ratio)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (exact enough that a same-rank resize reproduces a file to < 1e-6)."""
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``up @ down`` ([out, r] @ [r, in]) without forming it: QR of both factors,
    then the SVD of the small r x r core (U = Qu Uc, Vh = Vhc Qd^T)."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().T)
    uc, s, vhc = torch.linalg.svd(ru @ rd.T)
    return qu @ uc, s, vhc @ qd.T


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U[:, :rank] diag(S[:rank]), Vh[:rank]), as sd-scripts puts S on the up side."""
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


def as_module_shapes(up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat factors -> kohya shapes: Linear [out, r], [r, in]; conv [out, r, 1, 1], [r, in, k, k]."""
    if len(weight_shape) == 4:
        rank = down.shape[0]
        return up.reshape(weight_shape[0], rank, 1, 1), down.reshape(rank, *weight_shape[1:])
    return up, down
