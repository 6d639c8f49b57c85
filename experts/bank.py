"""LoraBank: E LoRA adapters of one linear layer, stacked as a single LoRA of rank E*R.

SMoRA's observation (Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts LoRA
for Multi-Task Learning", arXiv 2501.15103): routing among E LoRAs of rank R is the same computation as
gating blocks of ranks inside one LoRA of rank E*R. The bank therefore stores

    A: (E*R, d_in)      B: (d_out, E*R)      (adapter e owns rows/columns e*R .. e*R + R - 1)

and computes, for gates of shape (B, T, S),

    z     = dropout(x) @ A.T                           # (B, T, E*R)
    z     = z * expand(gates) * rank_scale             # S = E: one gate per adapter, repeated R times
                                                       # S = E*R: one gate per rank (SMoRA)
    delta = z @ B.T                                    # (B, T, d_out)

with rank_scale[e*R + j] = scaling_e if rank j of adapter e is real, else 0 (adapters of smaller rank
are zero-padded up to R and masked). `gates=None` sums every adapter with weight 1 (one adapter alone
is then plain LoRA; several give the summed composition O-LoRA answers with). There is no Python loop
over experts: two matmuls whatever E is.

Training a subset: `freeze_experts` zeroes the gradients of frozen adapters' rows of A and columns of
B with a tensor hook, so one bank can hold frozen old adapters and a trainable new one (O-LoRA), or
all trainable (joint training of a mixture). Optimisers over banks must use weight_decay=0 for the
frozen slices to stay exact.

Sparse dispatch: when gates are constant over each sequence ((B, 1, E): retrieval routing, a
heterogeneous batch where each row names its adapter) and each row selects at most half of the
experts, `forward` gathers each row's selected adapters and applies only those (gather + batched
matmul), so a batch whose 32 rows use 32 different adapters costs about what one adapter does.

Token-level sparse dispatch (issue #14): when per-adapter gates change per token ((B, T, E) with at
most k non-zero per token: token-gate, mixer), `forward` sorts the N*K (token, expert) assignments by
expert once, packs each expert's tokens into a capacity-padded buffer (E_used, C, d_in), runs two
batched matmuls (inner size R, not E*R) and scatters back with the gate weights (`_forward_tokens`).
Activations are O(N*K*R) instead of O(N*E*R). `dispatch` picks the path: "dense", "sparse" or
"auto", where auto uses a cost estimate, not a timing: sparse when the dense inner size E*R is at
least `SPARSE_FACTOR` (128) times the sparse one K*R (on CPU the gathers and their backward cost more
than the matmuls they save below that; see SPARSE_FACTOR).
Per-rank gates (S = E*R, SMoRA's rank router) stay on the dense path: its experts are single ranks,
so a grouped matmul would have inner size 1 per segment (no batching to gain), and a bank of rank
E*R is exactly the one LoRA SMoRA sizes its compute by.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoraBank(nn.Module):
    """E adapters for one linear layer d_in -> d_out, padded to a common rank R."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_experts: int,
        rank: int,
        *,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if n_experts < 1 or rank < 1:
            raise ValueError(f"a bank needs at least one expert of rank >= 1, got E={n_experts}, R={rank}")
        self.d_in, self.d_out, self.n_experts, self.rank = d_in, d_out, n_experts, rank
        kw = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.zeros(n_experts * rank, d_in, **kw))  # (E*R, d_in)
        self.B = nn.Parameter(torch.zeros(d_out, n_experts * rank, **kw))  # (d_out, E*R)
        # Which ranks are real (1) or padding (0), and each adapter's scaling.
        self.register_buffer("rank_mask", torch.zeros(n_experts * rank, device=device), persistent=True)
        self.register_buffer("scaling", torch.zeros(n_experts, device=device), persistent=True)
        self.register_buffer("frozen", torch.zeros(n_experts, dtype=torch.bool, device=device), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sparse = True  # sparse dispatch for sequence-constant gates (see _forward_selected)
        self.dispatch = "auto"  # per-token gates: "auto" | "dense" | "sparse" (see _forward_tokens)
        self._hooks: list = []

    # ---- filling the slots -------------------------------------------------------------------
    def _slot(self, e: int) -> slice:
        if not 0 <= e < self.n_experts:
            raise IndexError(f"expert {e} out of range for a bank of {self.n_experts}")
        return slice(e * self.rank, (e + 1) * self.rank)

    @torch.no_grad()
    def set_expert(self, e: int, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Copy adapter e's A (r, d_in) and B (d_out, r) into its slot, zero-padding r up to R."""
        r = A.shape[0]
        if A.shape != (r, self.d_in) or B.shape != (self.d_out, r) or r > self.rank:
            raise ValueError(
                f"expert shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a bank "
                f"of d_in={self.d_in}, d_out={self.d_out}, R={self.rank}"
            )
        s = self._slot(e)
        self.A[s].zero_()
        self.B[:, s].zero_()
        self.A[s.start : s.start + r].copy_(A)
        self.B[:, s.start : s.start + r].copy_(B)
        self.rank_mask[s].zero_()
        self.rank_mask[s.start : s.start + r] = 1.0
        self.scaling[e] = scaling

    @torch.no_grad()
    def init_expert(self, e: int, rank: int, scaling: float, generator: torch.Generator | None = None) -> None:
        """Fresh trainable adapter in slot e, initialised as PEFT does: A ~ kaiming-uniform(a=sqrt(5)), B = 0."""
        A = torch.empty(rank, self.d_in, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.d_in)  # kaiming_uniform_(a=sqrt(5)) on a (rank, d_in) matrix
        A.uniform_(-bound, bound, generator=generator)
        self.set_expert(e, A.to(self.A.dtype), torch.zeros(self.d_out, rank, dtype=self.B.dtype), scaling)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter e's (A, B) with the padding removed (detached copies)."""
        s = self._slot(e)
        r = int(self.rank_mask[s].sum().item())
        return self.A[s.start : s.start + r].detach().clone(), self.B[:, s.start : s.start + r].detach().clone()

    def expert_rank(self, e: int) -> int:
        return int(self.rank_mask[self._slot(e)].sum().item())

    # ---- training a subset -------------------------------------------------------------------
    def freeze_experts(self, frozen: list[bool] | torch.Tensor) -> None:
        """Zero the gradients of the frozen experts' slices (the others train)."""
        self.frozen.copy_(torch.as_tensor(frozen, dtype=torch.bool, device=self.frozen.device))
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if bool(self.frozen.any()):
            keep = (~self.frozen).repeat_interleave(self.rank)  # (E*R,)
            self._hooks.append(self.A.register_hook(lambda g: g * keep.to(g.dtype)[:, None]))
            self._hooks.append(self.B.register_hook(lambda g: g * keep.to(g.dtype)[None, :]))

    # ---- compute -----------------------------------------------------------------------------
    def rank_scale(self) -> torch.Tensor:
        """(E*R,) scaling of each rank, zero on padding."""
        return self.rank_mask * self.scaling.repeat_interleave(self.rank)

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None, *, dense_gate_grad: bool = False) -> torch.Tensor:
        """x (..., d_in), gates (..., S) broadcastable to x's leading dims, S in {E, E*R} -> (..., d_out).

        `dense_gate_grad`: the caller needs d loss / d gates on the unselected (zero) slots too (a
        straight-through gate such as LoRA-Mixer's); "auto" then keeps the dense path while gradients
        flow into the gates, since the sparse path only computes the selected experts.
        """
        if self.sparse and self._sequence_gates(x, gates):
            k = int((gates != 0).sum(-1).max().item())
            if 2 * k <= self.n_experts:
                return self._forward_selected(x, gates, k)
        elif self._token_gates(x, gates) and self.dispatch != "dense":
            k = max(1, int((gates != 0).sum(-1).max().item()))
            needs_all = dense_gate_grad and gates.requires_grad and torch.is_grad_enabled()
            if self.dispatch == "sparse" or (self.SPARSE_FACTOR * k <= self.n_experts and not needs_all):
                return self._forward_tokens(x, gates, k)
        z = F.linear(self.dropout(x), self.A)  # (..., E*R)
        scale = self.rank_scale().to(z.dtype)  # (E*R,)
        if gates is None:
            z = z * scale
        elif gates.shape[-1] == self.n_experts:
            z = (z.unflatten(-1, (self.n_experts, self.rank)) * gates.to(z.dtype).unsqueeze(-1)).flatten(-2) * scale
        elif gates.shape[-1] == self.n_experts * self.rank:
            z = z * gates.to(z.dtype) * scale
        else:
            raise ValueError(
                f"gates have {gates.shape[-1]} slots; this bank takes {self.n_experts} (per adapter) "
                f"or {self.n_experts * self.rank} (per rank)"
            )
        return F.linear(z, self.B)  # (..., d_out)

    SPARSE_FACTOR = 128
    """auto: sparse when E*R >= SPARSE_FACTOR * K*R. Measured on 2 shared CPU cores (bench/routing.py
    --part speed, bench/results/routing-speed.txt), the dense bank stays faster up to E=128 at k=2 (its
    two GEMMs beat the sparse path's gathers and their index_add backward); from about E=256 the dense
    activations (N*E*R) dominate memory and the two paths cost about the same, so sparse wins there."""

    def _token_gates(self, x: torch.Tensor, gates: torch.Tensor | None) -> bool:
        """Per-adapter gates given per token: (..., E) with the leading dims of x."""
        if self.dispatch not in ("auto", "dense", "sparse"):
            raise ValueError(f"dispatch must be 'auto', 'dense' or 'sparse', got {self.dispatch!r}")
        return (gates is not None and gates.shape[-1] == self.n_experts and self.n_experts > 1
                and gates.shape[:-1] == x.shape[:-1])

    def _forward_tokens(self, x: torch.Tensor, gates: torch.Tensor, k: int) -> torch.Tensor:
        """Token-level sparse dispatch: each token computes only its k selected adapters.

        The N*K assignments (token, expert) are sorted by expert once, each used expert's tokens are
        packed into a capacity-padded buffer (E_used, C, d_in) and two `bmm`s (inner size R) compute
        them, as CPU MoE kernels do; the results are scattered back weighted by the gates with one
        Differentiable in x, A, B and the gates (autograd through gather/scatter).
        Equal to the dense path (tests/experts/test_token_dispatch.py).
        """
        E, R = self.n_experts, self.rank
        lead = x.shape[:-1]
        xf = self.dropout(x).reshape(-1, self.d_in)  # (N, d_in)
        gf = gates.reshape(-1, E).to(x.dtype)  # (N, E)
        N = xf.shape[0]
        idx = gf.abs().topk(k, dim=-1).indices  # (N, K)
        w = gf.gather(-1, idx)  # (N, K) (zero where a token uses fewer than k)
        flat_e = idx.reshape(-1)  # (N*K,) assignments, token-major
        order = torch.argsort(flat_e, stable=True)  # assignments sorted by expert (once per call)
        used, counts = torch.unique_consecutive(flat_e[order], return_counts=True)  # (U,), (U,)
        U, C = used.numel(), int(counts.max().item())  # used experts, capacity
        seg = torch.repeat_interleave(torch.arange(U, device=x.device), counts)  # (N*K,) sorted
        starts = torch.cumsum(counts, 0) - counts
        slot_sorted = seg * C + torch.arange(flat_e.numel(), device=x.device) - starts[seg]  # buffer slot
        slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # (N*K,) slot of assignment j
        # which token fills each buffer slot (N: a zero row), and its gate weight
        j = torch.arange(N * k, device=x.device)  # assignment j belongs to token j // k
        src = torch.full((U * C,), N, dtype=torch.long, device=x.device).scatter_(0, slot, j // k)
        asg = torch.full((U * C,), N * k, dtype=torch.long, device=x.device).scatter_(0, slot, j)
        w_slot = torch.cat([w.reshape(-1), w.new_zeros(1)]).index_select(0, asg)  # (U*C,)
        buf = torch.cat([xf, xf.new_zeros(1, self.d_in)]).index_select(0, src).view(U, C, self.d_in)
        A = self.A.view(E, R, self.d_in)[used].to(x.dtype)  # (U, R, d_in)
        Bw = self.B.view(self.d_out, E, R)[:, used].permute(1, 2, 0).to(x.dtype)  # (U, R, d_out)
        scale = self.rank_scale().view(E, R)[used].to(x.dtype)  # (U, R)
        z = torch.bmm(buf, A.transpose(1, 2)) * (scale.unsqueeze(1) * w_slot.view(U, C, 1))  # (U, C, R)
        y = torch.bmm(z, Bw).view(U * C, self.d_out)  # (U*C, d_out), already gate-weighted
        out = y.index_select(0, slot).view(N, k, self.d_out).sum(1)  # (N, d_out)
        return out.view(*lead, self.d_out)

    def _sequence_gates(self, x: torch.Tensor, gates: torch.Tensor | None) -> bool:
        """Per-adapter gates constant over each sequence: (B, 1, E) or (1, 1, E) for x (B, T, d_in)."""
        return (gates is not None and x.dim() == 3 and gates.dim() == 3 and gates.shape[1] == 1
                and gates.shape[-1] == self.n_experts and self.n_experts > 1 and gates.shape[0] in (1, x.shape[0]))

    def _forward_selected(self, x: torch.Tensor, gates: torch.Tensor, k: int) -> torch.Tensor:
        """Sparse dispatch for sequence-constant gates: each row computes only its k selected adapters.

        Gathers the selected adapters' A and B per row and applies them with two batched matmuls, as
        multi-LoRA servers do (Punica / S-LoRA's gather-BMM): cost k*R ranks per row instead of E*R.
        Equal to the dense path (tests/router/test_bank_dispatch.py).
        """
        Bsz = x.shape[0]
        g = gates[:, 0, :].to(x.dtype).expand(Bsz, -1)  # (B, E)
        idx = g.abs().topk(k, dim=-1).indices  # (B, K)
        w = g.gather(-1, idx)  # (B, K)
        E, R = self.n_experts, self.rank
        A = self.A.view(E, R, self.d_in)[idx].reshape(Bsz, k * R, self.d_in)  # (B, K*R, d_in)
        Bw = self.B.view(self.d_out, E, R).permute(1, 2, 0)[idx].reshape(Bsz, k * R, self.d_out)  # (B, K*R, d_out)
        scale = (self.rank_scale().view(E, R)[idx].to(x.dtype) * w.unsqueeze(-1)).reshape(Bsz, 1, k * R)  # (B, 1, K*R)
        z = torch.bmm(self.dropout(x), A.transpose(1, 2).to(x.dtype)) * scale  # (B, T, K*R)
        return torch.bmm(z, Bw.to(x.dtype))  # (B, T, d_out)

    def delta_weight(self, weights: torch.Tensor | list[float] | None = None) -> torch.Tensor:
        """The dense update sum_e w_e * scaling_e * B_e A_e, shape (d_out, d_in) (for merging)."""
        scale = self.rank_scale()
        if weights is not None:
            w = torch.as_tensor(weights, dtype=scale.dtype, device=scale.device)
            scale = scale * w.repeat_interleave(self.rank)
        return (self.B * scale.to(self.B.dtype)) @ self.A

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, experts={self.n_experts}, rank={self.rank}"
