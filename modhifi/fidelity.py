"""The per-layer quantities of method.md §1–2: component similarity Q, singleton fidelity,
saliency, subset fidelity, compensation (δ* and refit) and greedy subset selection.

Everything follows from the second moment H of a layer's input patches (`modhifi.moments`): the
contribution of input channel i to output channel c is A_ci = Φ_i ⋆ W_ci, so
E⟨A_ci, A_cj⟩ = w_ciᵀ H[i,j] w_cj. Per-sample contributions are never materialised.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from modhifi.errors import UserError
from modhifi.moments import CHUNK_ELEMENTS, LayerMoments, moments_of

RIDGE_TRIES = 3  # a ridge up to 1000× the asked one before the SVD


def ridge_solve(A: Tensor, B: Tensor, lam: float) -> Tensor:
    """(A + λ·mean(diag A)·I)⁻¹ B for a batch of PSD systems A (..., n, n), B (..., n, m).

    A system that does not factorise at that ridge is tried again with it ×10, at most
    `RIDGE_TRIES` times: rounding can leave a computed PSD matrix with eigenvalues a little below
    zero (a centred second moment of features whose mean dwarfs their spread, summed in float32
    batches: about −2·10⁻⁴ of its mean diagonal on a random-weight wide_resnet50_2). What still
    fails gets the pseudo-inverse of its last ridged matrix: with λ = 0 (dead channels,
    collinear inputs) the minimum-norm optimum. That is an SVD each, a hundred times a
    factorisation at d = 9,216.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    scale = lam * A.diagonal(dim1=-2, dim2=-1).mean(-1)  # (...,): λ relative, so unit-free
    factor, info = torch.linalg.cholesky_ex(A + scale[..., None, None] * eye)
    X = torch.cholesky_solve(B, factor)
    failed = info != 0  # (...,)
    for _ in range(RIDGE_TRIES if lam > 0 else 0):
        if not failed.any():
            return X
        scale = torch.where(failed, 10 * scale, scale)
        factor, info = torch.linalg.cholesky_ex(A[failed] + scale[failed][..., None, None] * eye)
        X[failed] = torch.cholesky_solve(B[failed], factor)
        still = torch.zeros_like(failed)
        still[failed] = info != 0
        failed = still
    if failed.any():
        X[failed] = torch.linalg.pinv(A[failed] + scale[failed][..., None, None] * eye,
                                      hermitian=True) @ B[failed]
    return X


def _as_index(S: Iterable[int] | Tensor, device: torch.device, size: int) -> Tensor:
    """Sorted unique LongTensor of component indices, each checked to be in 0..size-1."""
    S = S if isinstance(S, Tensor) else sorted(S)
    index = torch.as_tensor(S, dtype=torch.long, device=device).unique()
    if len(index) and not 0 <= int(index[0]) <= int(index[-1]) < size:
        raise UserError(f"input channels {index.tolist()} are out of range for a layer with "
                        f"{size} inputs; pass indices 0..{size - 1}")
    return index


@dataclass(frozen=True, eq=False)
class LayerFidelity:
    """Component similarity, fidelity scores and compensation of one layer (method.md §1–2).

    Results are ordinary tensors (the weight is detached, nothing records autograd), so a returned
    weight can become an `nn.Parameter`.
    """

    H: Tensor  # (d, d) float64 second moment of the input patches per sample (centred or not)
    weight: Tensor  # (c_out, c_in[, k, k]) detached copy of the layer's weight
    lam: float  # ridge strength, relative to the mean diagonal of the matrix being inverted
    # (L, d) float64 mean patch at each position, subtracted from H (`from_moments`, centred);
    # None: H as given, uncentred unless its maker says otherwise
    means: Tensor | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise UserError(f"lam={self.lam!r} must be a finite number ≥ 0 (the ridge strength "
                            "relative to the mean diagonal; 0 is exact)")

    def _output(self, c: int) -> int:
        """`c` checked to be an output channel."""
        c_out = self.weight.shape[0]
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < c_out:
            raise UserError(f"output channel {c!r} is out of range for a layer with {c_out} "
                            f"outputs; pass 0..{c_out - 1}")
        return c

    @classmethod
    def from_moments(
        cls, weight: Tensor, moments: LayerMoments, *, centered: bool = False, lam: float = 1e-4
    ) -> LayerFidelity:
        """Fidelity of a layer from its weight and input statistics.

        Args:
            weight: (c_out, c_in, k, k) or (c_out, c_in).
            moments: statistics of the layer's input.
            centered: subtract per-position means (use when BatchNorm follows the layer).
            lam: ridge strength relative to the mean diagonal; 0 is exact.
        """
        H = moments.centered_second() if centered else moments.mean_second()
        if weight[0].numel() != H.shape[0]:
            raise UserError(
                f"weight {tuple(weight.shape)} does not match input statistics of width {H.shape[0]}; "
                "pass the moments of this layer's input"
            )
        means = moments.position_sum.double() / moments.samples if centered else None
        return cls(H=H, weight=weight.detach().clone(), lam=lam, means=means)

    def uncentred(self) -> LayerFidelity:
        """This layer's fidelity on E[Σ_positions PᵀP], the means put back (itself where no
        means were subtracted)."""
        if self.means is None:
            return self
        return LayerFidelity(H=self.H.addmm(self.means.T, self.means), weight=self.weight,
                             lam=self.lam)

    def mean_square(self) -> Tensor:
        """(d,) E[Σ_positions P²] of each patch feature: the diagonal of the uncentred H."""
        square = self.H.diagonal()
        return square if self.means is None else square + self.means.square().sum(0)

    @cached_property
    def w(self) -> Tensor:
        """(c_out, c_in, K) the weight in float64, K = k² (1 for Linear)."""
        return self.weight.to(self.H).reshape(self.weight.shape[0], self.weight.shape[1], -1)

    @cached_property
    def Hw(self) -> Tensor:
        """(c_out, d) row c is (H w_c)ᵀ (H is symmetric): E[patch · Y_c], one matmul for all c."""
        return self.w.reshape(self.w.shape[0], -1) @ self.H

    @cached_property
    def saliency(self) -> Tensor:
        """(c_out, c_in) r_ci = (Q_c 1)_i = E⟨Y_c, A_ci⟩."""
        return (self.w * self.Hw.view(self.w.shape)).sum(-1)

    @cached_property
    def energy(self) -> Tensor:
        """(c_out,) E‖Y_c‖² = 1ᵀQ_c 1 (bias ignored)."""
        return self.saliency.sum(1)

    @cached_property
    def singleton(self) -> Tensor:
        """(c_out, c_in) s_ci = r_ci² / (Q_c[i,i] · 1ᵀQ_c 1), the squared cosine of Y_c and A_ci."""
        c_out, c_in, K = self.w.shape
        H_ii = self.H.view(c_in, K, c_in, K).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (c_in, K, K)
        Q_ii = torch.einsum("cik,ikl,cil->ci", self.w, H_ii, self.w)  # (c_out, c_in) diagonals of Q_c
        denominator = Q_ii * self.energy[:, None]
        # Dead channels (0/0) get fidelity 0; the clamp only absorbs rounding.
        return torch.where(denominator > 0, self.saliency**2 / denominator, 0.0).clamp(0, 1)

    def _Q(self, rows: Tensor | slice, keep: Tensor | None = None) -> Tensor:
        """(n_rows, n_keep, n_keep) Q_c[keep, keep] for the output channels `rows`."""
        c_out, c_in, K = self.w.shape
        w, H = self.w[rows], self.H.view(c_in, K, c_in, K)
        if keep is not None:
            w, H = w[:, keep], H[keep][:, :, keep]
        return torch.einsum("cik,ikjl,cjl->cij", w, H, w)

    def Q(self, c: int) -> Tensor:
        """(c_in, c_in) component similarity of output channel c: Q_c[i,j] = E⟨A_ci, A_cj⟩."""
        c = self._output(c)
        return self._Q(slice(c, c + 1))[0]

    def _delta(self, Q_SS: Tensor, r_S: Tensor) -> Tensor:
        """(..., n) δ*_S = 1 + Q_SS⁻¹ Q_SS̄ 1, using Q_SS̄ 1 = r_S − Q_SS 1."""
        return 1 + ridge_solve(Q_SS, (r_S - Q_SS.sum(-1))[..., None], self.lam)[..., 0]

    def compensation(self, c: int, S: Iterable[int] | Tensor) -> Tensor:
        """Optimal rescaling δ* of the kept components of output channel c.

        Args:
            c: output channel.
            S: kept input channels.

        Returns:
            (c_in,) δ*_i for i in S, 0 elsewhere.
        """
        Q = self.Q(c)
        S = _as_index(S, self.H.device, len(Q))
        delta = torch.zeros(len(Q), dtype=Q.dtype, device=Q.device)
        delta[S] = self._delta(Q[S][:, S], self.saliency[c, S])
        return delta

    def subset_fidelity(self, c: int, S: Iterable[int] | Tensor) -> float:
        """FS_c(S) = 1 − E‖Y_c − Σ_{i∈S} δ*_i A_ci‖² / E‖Y_c‖², in [0, 1] (the maximum when lam=0).

        Args:
            c: output channel.
            S: kept input channels.

        Returns:
            The share of the output's energy the kept components explain; 0 for a dead channel.
        """
        energy = self.energy[self._output(c)]
        if energy <= 0:
            return 0.0
        u = 1 - self.compensation(c, S)  # (c_in,) the share of each contribution that is lost
        return float((1 - u @ self.Q(c) @ u / energy).clamp(0, 1))

    def fidelity_curves(self) -> Tensor:
        """(c_out, c_in) FS_c of each output's HiFi set of size k (its top-k inputs), k = 1..c_in.

        HiFi sets of growing size are nested prefixes of one order, so one Cholesky factor L of
        the reordered Q_c gives every size at once: FS(top-k) = Σ_{j≤k} z_j² / E‖Y_c‖², L z = r
        (the explained energy r_Sᵀ Q_SS⁻¹ r_S of a prefix only needs the prefix of z).
        """
        c_out, c_in, _ = self.w.shape
        curves = []
        for rows in torch.arange(c_out, device=self.H.device).split(max(1, CHUNK_ELEMENTS // c_in**2)):
            order = self.singleton[rows].argsort(1, descending=True)  # (n, c_in)
            Q = self._Q(rows)                                          # (n, c_in, c_in)
            Q = Q.gather(1, order[:, :, None].expand_as(Q)).gather(2, order[:, None, :].expand_as(Q))
            # A relative ridge, and a tiny one even at lam=0 so dead inputs do not break Cholesky.
            scale = max(self.lam, 1e-12) * Q.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-300)
            L, _ = torch.linalg.cholesky_ex(Q + scale[:, None, None] * torch.eye(c_in).to(Q))
            r = self.saliency[rows].gather(1, order)[..., None]      # (n, c_in, 1)
            z = torch.linalg.solve_triangular(L, r, upper=False)[..., 0]
            energy = self.energy[rows, None]
            curves.append(torch.where(energy > 0, z.square().cumsum(1) / energy, 0.0).clamp(0, 1))
        return torch.cat(curves)

    def _like_weight(self, w: Tensor) -> Tensor:
        return w.reshape(self.weight.shape).to(self.weight)

    def rescaled_weight(self, keep: Tensor) -> Tensor:
        """The paper's compensation: each kept slice W[c, i] times δ*_ci, removed slices zero.

        Args:
            keep: kept input channels, the same for every output channel.

        Returns:
            A weight of the original shape, dtype and device.
        """
        c_out, c_in, K = self.w.shape
        keep = _as_index(keep, self.H.device, c_in)
        # One batch of |keep|×|keep| systems per chunk of output channels bounds the memory.
        chunk = max(1, CHUNK_ELEMENTS // max(1, len(keep) ** 2 * K))
        row_chunks = torch.arange(c_out, device=keep.device).split(chunk)
        delta = torch.cat(
            [self._delta(self._Q(rows, keep), self.saliency[rows][:, keep]) for rows in row_chunks]
        )  # (c_out, |keep|)
        w = torch.zeros_like(self.w)
        w[:, keep] = self.w[:, keep] * delta[..., None]
        return self._like_weight(w)

    def refit_weight(self, keep: Tensor) -> Tensor:
        """Least squares of the kept kernel slices for all outputs: W'_C = (H_CC + λI)⁻¹ H_{C,all} w.

        Args:
            keep: kept input channels, the same for every output channel.

        Returns:
            A weight of the original shape, dtype and device, zero on removed channels.
        """
        c_out, c_in, K = self.w.shape
        keep = _as_index(keep, self.H.device, c_in)
        # The d-indices of the kept channels' k² blocks.
        C = (keep[:, None] * K + torch.arange(K, device=keep.device)).flatten()
        W = self.w.reshape(c_out, -1)  # (c_out, d)
        H_C = self.H[C]  # (|C|, d)
        w = torch.zeros_like(W)
        w[:, C] = ridge_solve(H_C[:, C], H_C @ W.T, self.lam).T
        return self._like_weight(w)

    def reconstruction_error(self, new_weight: Tensor) -> Tensor:
        """(c_out,) local error E‖Y_c − Y'_c‖² = (w_c − w'_c)ᵀ H (w_c − w'_c) of a replacement weight.

        Args:
            new_weight: of the original shape; the original on kept channels and zero elsewhere
                means no compensation.
        """
        c_out = self.w.shape[0]
        D = self.w.reshape(c_out, -1) - new_weight.detach().to(self.H).reshape(c_out, -1)  # (c_out, d)
        return ((D @ self.H) * D).sum(1)


def hifi_size(fidelity: LayerFidelity, *, level: float = 0.8) -> Tensor:
    """(c_out,) the smallest share of inputs whose HiFi set reaches fidelity `level`, per output."""
    curves = fidelity.fidelity_curves()  # (c_out, c_in)
    return ((curves < level).sum(1) + 1).clamp(max=curves.shape[1]) / curves.shape[1]


# Factor columns gathered between two updates of the complements: each step then touches only
# this panel and the complement's columns it needs, and the updates are matrix products.
PANEL = 256


def greedy_subset(consumers: Sequence[tuple[LayerFidelity, Sequence[int]]], size: int, *,
                  panel: int = PANEL) -> tuple[list[int], list[float]]:
    """Order `size` shared components by greedy subset fidelity under `refit`.

    Each step adds the component that raises Σ over consumers and their outputs of the refit
    fidelity FS_c(S) = b_cSᵀ H_SS⁻¹ b_cS / E‖Y_c‖² (b_c = H w_c) the most. Its gain is the same form
    in the Schur complements of H and b on S: what input i adds that S does not already explain.
    Unlike the union of singleton HiFi sets, this sees correlated inputs. Each consumer's
    complements are kept by `_Complement`, updated in panels of `panel` factor columns.

    Args:
        consumers: (fidelity, index) pairs; index[g] is that layer's input channel of component g.
        size: number of shared components.
        panel: factor columns between two updates of the complements (any value gives the same
            order, up to rounding).

    Returns:
        The components in the order chosen, and the summed fidelity each one added.
    """
    complements = [_Complement(fidelity, index, panel) for fidelity, index in consumers]
    chosen = torch.zeros(size, dtype=torch.bool)
    order, gains = [], []
    for _ in range(size):
        gain = sum((complement.gains() for complement in complements),
                   torch.zeros(size, dtype=torch.float64))            # (size,)
        # A consumer whose open inputs are all explained (few samples at depth, dead channels)
        # adds 0 from now on: its steps are skipped.
        complements = [complement for complement in complements if not complement.explained]
        best = int(gain.masked_fill_(chosen, -math.inf).argmax())
        chosen[best] = True
        order.append(best)
        gains.append(float(gain[best]))
        for complement in complements:
            complement.take(best)
    return order, gains


class _Complement:
    """One consumer's Schur complements on the channels chosen so far, for `greedy_subset`.

    After choosing the set S: H̃ = H − F Fᵀ and b̃ = B − F Z (B = H wᵀ, one column per output
    normalised by its energy, or as few as span its rows), with F (d, r) the pivoted Cholesky
    factor of the chosen blocks and Z (r, m) their steps. A step needs only the complement's
    column at the chosen block and, for every open channel, its diagonal block of H̃ and of b̃ b̃ᵀ
    (the gain is tr((H̃_ii + ridge)⁻¹ b̃_i b̃_iᵀ)). So the complements are held explicitly only as
    of the last panel, and the panel's columns Fp, Zp correct them on the fly: H̃ = H̃₀ − Fp Fpᵀ,
    b̃ = b̃₀ − Fp Zp. Every `panel` columns, two matrix products bring H̃₀ and b̃₀ up to date and
    drop the chosen channels' rows, so the work shrinks as the set grows, instead of one rank-k
    update of all of b̃ and a read of all of F per step (memory-bound). A step reads Fp once and
    runs a fixed, small number of operations: on 1×1 layers the per-operation overhead, not the
    arithmetic, was most of the time.
    """

    def __init__(self, fidelity: LayerFidelity, index: Sequence[int], panel: int):
        c_out, c_in, K = fidelity.w.shape
        H = fidelity.H                                             # (d, d), only read
        self.K, self.lam = K, fidelity.lam
        self.index = torch.as_tensor(index, device=H.device)      # component -> input channel
        # Below this a block's complement is rounding: its input is already explained (or dead).
        # Positive: centred statistics of inputs that do not vary (a layer whose inputs are the
        # same for every sample) are rounding only, and can sum to zero or less.
        self.negligible = max(float(1e-9 * H.diagonal().mean()), torch.finfo(H.dtype).tiny)
        # Where each input channel's block is among those still held (-1: dropped).
        self.position = torch.arange(c_in, device=H.device)
        norm = fidelity.energy.clamp(min=1e-30).sqrt()             # (c_out,)
        b = (fidelity.Hw / norm[:, None]).T.contiguous()           # (d, c_out)
        if c_out > len(H):
            # Only b̃ b̃ᵀ matters, and every update acts on b̃ from the left: b·Q for any Q with
            # orthonormal columns spanning b's rows gives the same gains. With bᵀ = QR, b·Q = Rᵀ:
            # d columns instead of c_out (a 1×1 layer that widens 2-4× reads half to a quarter).
            b = torch.linalg.qr(b.T, mode="r").R.T                  # (d, d)
        self.H, self.b = H, b  # (d', d'), (d', m): H̃₀ is only ever replaced, never written
        self.width = max(panel, K)
        self.F = H.new_empty(len(H), self.width)                   # Fp (d', width) and
        self.Z = H.new_empty(self.width, b.shape[1])               # Zp (width, m), filled
        self.filled = 0                                            # up to this column
        self._held()

    def _held(self) -> None:
        """Each component's held block, and each held channel's diagonal blocks of H̃ and of
        b̃ b̃ᵀ, (d'/K, K, K) each, updated apart from H̃₀ and b̃₀ until the next panel."""
        held, K = len(self.H) // self.K, self.K
        self.at = self.position[self.index].clamp(min=0)           # (size,) dropped ones: any
        self.rows = self.at.tolist()                               # the same, read per step
        self.open = torch.ones(held, dtype=torch.bool, device=self.H.device)  # not yet chosen
        diagonal = self.H.view(held, K, held, K).diagonal(dim1=0, dim2=2)  # (K, K, d'/K)
        self.blocks = diagonal.permute(2, 0, 1).clone()
        b = self.b.view(held, K, self.b.shape[1])                  # (d'/K, K, m)
        self.outer = b @ b.mT

    def gains(self) -> Tensor:
        """(size,) float64 on the CPU: the refit fidelity each component would add (chosen ones
        are the caller's to ignore)."""
        blocks, outer, lam = self.blocks, self.outer, self.lam
        # Explained blocks add nothing; solving them would need a pseudo-inverse each. A chosen
        # block's complement is rounding too.
        if self.K == 1:  # scalar blocks: the solve is a division (with ridge_solve's ridge)
            live = (blocks.view(-1) > self.negligible) & self.open  # (d',)
            gain = (outer.view(-1) / (blocks.view(-1) * (1 + lam))).where(live, 0.0)
        else:  # tr((H̃_ii + ridge)⁻¹ b̃_i b̃_iᵀ)
            live = (blocks.diagonal(dim1=-2, dim2=-1).mean(-1) > self.negligible) & self.open
            gain = torch.zeros(len(blocks), dtype=blocks.dtype, device=blocks.device)
            gain[live] = ridge_solve(blocks[live], outer[live], lam).diagonal(
                dim1=-2, dim2=-1).sum(-1)
        # No open block live: every gain is 0 and stays 0 (complements only shrink).
        self.explained = not live.any()
        return gain[self.at].double().cpu()

    def take(self, component: int) -> None:
        """Add `component` to the chosen set: one more block of the factor."""
        K, used = self.K, self.filled
        at = self.rows[component]
        self.open[at] = False
        block = slice(at * K, (at + 1) * K)
        Fp, Zp, Fb = self.F[:, :used], self.Z[:used], self.F[block, :used]  # Fb (K, used)
        pivot = self.H[block, block] - Fb @ Fb.T                   # (K, K) block of H̃
        scale = float(pivot.trace()) / K
        if scale <= self.negligible:
            return  # nothing new to take out of the other components
        inverse = self._inverse_factor(pivot, scale)               # (K, K) L⁻¹, or None
        if inverse is None:
            return  # numerically explained already
        step = inverse @ (self.b[block] - Fb @ Zp)                 # (K, m)
        # One read of Fp for H̃'s columns at the block and b̃ stepᵀ (H̃₀ is symmetric).
        both = Fp @ torch.cat([Fb.T, Zp @ step.T], 1)              # (d', 2K)
        new = (self.H[block].T - both[:, :K]) @ inverse.T          # (d', K)
        cross = self.b @ step.T - both[:, K:]                      # (d', K): b̃ stepᵀ
        # b̃ − new·step: each held channel's blocks of H̃ and b̃ b̃ᵀ change by (K, K) terms.
        if K == 1:
            n, x = new.view(-1), cross.view(-1)
            self.blocks.view(-1).sub_(n * n)
            self.outer.view(-1).sub_(n * (2 * x - n * (step @ step.T).view(())))
        else:
            n, x = new.view(-1, K, K), cross.view(-1, K, K)        # (d'/K, K, K)
            self.blocks -= n @ n.mT
            self.outer -= n @ x.mT + x @ n.mT - n @ (step @ step.T) @ n.mT
        self.F[:, used:used + K], self.Z[used:used + K] = new, step
        self.filled += K
        if self.filled + K > self.width:
            self._update()

    def _inverse_factor(self, pivot: Tensor, scale: float) -> Tensor | None:
        """L⁻¹ of the ridged pivot block L Lᵀ = pivot + λ·scale·I, or None if it is singular."""
        if self.K == 1:  # a scalar: no factorisation to call
            return pivot.new_full((1, 1), 1 / math.sqrt(scale * (1 + self.lam)))
        eye = torch.eye(self.K, dtype=pivot.dtype, device=pivot.device)
        lower, info = torch.linalg.cholesky_ex(pivot + self.lam * scale * eye)
        return None if info else torch.linalg.solve_triangular(lower, eye, upper=False)

    def _update(self) -> None:
        """H̃₀ −= Fp Fpᵀ, b̃₀ −= Fp Zp; drop the chosen channels' rows; an empty panel."""
        Fp, Zp = self.F[:, :self.filled], self.Z[:self.filled]
        kept = self.open.nonzero()[:, 0]                           # held blocks still open
        rows = (kept[:, None] * self.K + torch.arange(self.K, device=kept.device)).flatten()
        Fr = Fp[rows]
        self.H = torch.addmm(self.H[rows[:, None], rows], Fr, Fr.T, alpha=-1)  # one gather
        self.b = torch.addmm(self.b[rows], Fr, Zp, alpha=-1)
        renumber = torch.full_like(self.open, -1, dtype=torch.long)
        renumber[kept] = torch.arange(len(kept), device=kept.device)
        self.position = torch.where(self.position >= 0, renumber[self.position.clamp(min=0)], -1)
        self.F = self.F.new_empty(len(rows), self.width)
        self.filled = 0
        # Recomputed from the complements themselves: no rounding builds up across panels.
        self._held()


def layer_fidelity(
    layer: nn.Conv2d | nn.Linear, inputs: Tensor, *, centered: bool = False, lam: float = 1e-4
) -> LayerFidelity:
    """Fidelity of one layer from one batch of its inputs.

    Args:
        layer: an `nn.Conv2d` with groups=1 or an `nn.Linear`.
        inputs: (N, c_in, H, W) or (N, [T,] c_in).
        centered: subtract per-position means (use when BatchNorm follows the layer).
        lam: ridge strength relative to the mean diagonal of the matrix inverted; 0 is exact.

    Returns:
        The layer's `LayerFidelity`.
    """
    moments = moments_of(layer, inputs)
    return LayerFidelity.from_moments(layer.weight, moments, centered=centered, lam=lam)
