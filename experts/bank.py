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
most k non-zero per token: token-gate, mixer), each token computes only its k experts, with one of two
kernels (`LoraBank.kernel`, "auto" picks: `_uses_csr`). The csr kernel (CPU, no adapter gradients) reads
the selection as a sparse (N, E*R) matrix with K*R columns per token: the down projection is a sampled
dense-dense matmul (`torch.sparse.sampled_addmm`: x A^T at those columns only) and the up projection a CSR @
dense product added straight into the base output (`_CsrDown`, `_CsrUp`), with no sort, padding or
scatter, so its cost stays flat in E. The grouped kernel sorts the N*K (token, expert) assignments by
expert once and lays each expert's tokens out in blocks of C slots (U blocks; C chosen from the counts
to pad least, `block_layout`; each expert's first block read in place). Chunk by chunk of blocks
(`chunk_blocks`: about 512 KiB on CPU, so the gathered rows stay in cache) it gathers the tokens' rows
(G, C, d_in), runs two batched matmuls (inner size R, not E*R) and adds each slot's gate-weighted row
back to its token with `index_add_` (`_forward_tokens`, `_GroupedDown`, `_GroupedUp`); projections that
take the same input (q, k, v) gather it once and do their down projections in one matmul (`_down`).
Activations kept for backward
are O(N*K*R) (the rank-R products), instead of O(N*E*R). `dispatch` picks the path: "dense", "sparse" or
"auto", where auto uses a cost estimate, not a timing: sparse when the dense inner size E*R is at
least `SPARSE_FACTOR` (16, grouped kernel) or `CSR_FACTOR` (4, csr kernel) times the sparse one K*R (below
that, on CPU, the dense bank's two GEMMs cost less than the sparse kernel's work; see those constants). Projections fed
by one shared gate (token-gate `shared`) share the plan of the sort through their common Routing
(`Routing.dispatch`).
Per-rank gates (S = E*R, SMoRA's rank router) stay on the dense path: its experts are single ranks,
so a grouped matmul would have inner size 1 per segment (no batching to gain), and a bank of rank
E*R is exactly the one LoRA SMoRA sizes its compute by.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def tensor_version(t: torch.Tensor) -> int:
    """t's in-place version counter (how caches keyed on a tensor notice it changed); inference tensors
    have none and cannot be modified in place outside inference mode, so they read as version 0."""
    return 0 if t.is_inference() else t._version


class _TokenPlan(NamedTuple):
    """Token dispatch of N tokens x K experts into U blocks of C slots (each block one expert's).

    The first `head` blocks are the E experts in order (head = E), read straight from the bank's
    weights; the rest are the experts `tail` names, whose weights are gathered per block. head = 0:
    every block is gathered (`block_layout`'s packed layout)."""

    head: int  # 0 or E: leading blocks that are experts 0..E-1 in order
    tail: torch.Tensor | None  # (U - head,) the expert of each further block; None: no further block
    U: int
    C: int
    src: torch.Tensor  # (U*C,) token read into each slot, and the row its output is added to (padding: token 0)
    w_slot: torch.Tensor  # (U*C,) gate weight of each slot (padding: 0, so its output row is zero)


CHUNK_BYTES = 1 << 19
"""On CPU the token dispatch works through its blocks in chunks whose packed input (or slot output) takes
about this many bytes (512 KiB: a core's L2), so a chunk's gathered rows and slot outputs are still in
cache when its matmuls and its scatter read them. Done in one piece they were written to memory and read
back (12 MB each per MiniLM projection at E=512, blocks of 16): on one thread the dispatch at E=512 took
about 2.3x a base projection in chunks against 5.1x in one piece (a one-off timing, /tmp, MiniLM shapes,
2,048 tokens, k=2). Other devices take every block at once (one kernel per step)."""


def chunk_blocks(device: torch.device, C: int, width: int, itemsize: int) -> int:
    """Blocks per chunk of the token dispatch: about CHUNK_BYTES of (C, width) blocks on CPU; all elsewhere."""
    if device.type != "cpu":
        return 1 << 30
    return max(1, CHUNK_BYTES // max(1, C * width * itemsize))


def _chunks(head: int, U: int, G: int):
    """(u0, u1) block ranges of at most G blocks, none across the in-place/gathered boundary `head`."""
    for lo, hi in ((0, head), (head, U)):
        for u0 in range(lo, hi, G):
            yield u0, min(hi, u0 + G)


def _w(W: torch.Tensor, head: int, tail: torch.Tensor | None, u0: int, u1: int) -> torch.Tensor:
    """The experts' weights of blocks u0..u1: in place, or gathered by `tail`."""
    return W[u0:u1] if u1 <= head else W.index_select(0, tail[u0 - head:u1 - head])


def _add(gW: torch.Tensor, g: torch.Tensor, head: int, tail: torch.Tensor | None, u0: int, u1: int) -> None:
    """Blocks u0..u1's weight gradients g added to their experts' rows of gW."""
    if u1 <= head:
        gW[u0:u1] += g
    else:
        gW.index_add_(0, tail[u0 - head:u1 - head], g)


class _GroupedDown(torch.autograd.Function):
    """z[u] = A_u @ x[src_u]^T for the U blocks u of the token dispatch: its gather and first grouped matmul.

    xf (N, d_in) the tokens, A (E, R', d_in) the experts' down projections (R' = R for one bank; the sum
    of the ranks when projections that take the same input are done together: their A side by side, one
    gather and one matmul of R' rows instead of one per projection), src (U*C,) each slot's token.
    Blocks 0..head-1 are experts 0..E-1 (head = E, or 0) and use A as it is; blocks head.. use the experts
    `tail` names, gathered per chunk (and their gradients added back with `index_add_`). The blocks are
    worked through `G` at a time (`chunk_blocks`): each chunk gathers its tokens' rows and multiplies them
    while they are in cache, and the packed input is never kept (backward gathers it again). Returns
    z (U, R', C).

    A Function so that its backward picks CPU-friendly shapes: every product keeps C (the long side) as an
    output dimension, and the input's gradient is scattered chunk by chunk."""

    @staticmethod
    def forward(ctx, xf, A, src, head, tail, G, C):
        U = src.numel() // C
        z = xf.new_empty(U, A.shape[1], C)
        for u0, u1 in _chunks(head, U, G):
            buf = xf.index_select(0, src[u0 * C:u1 * C]).view(u1 - u0, C, -1)
            torch.bmm(_w(A, head, tail, u0, u1), buf.transpose(1, 2), out=z[u0:u1])  # (g, R', C)
        ctx.head, ctx.G, ctx.C, ctx.N = head, G, C, xf.shape[0]
        ctx.save_for_backward(xf if ctx.needs_input_grad[1] else None, A, src, tail)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_z):
        xf, A, src, tail = ctx.saved_tensors
        head, G, C = ctx.head, ctx.G, ctx.C
        need = ctx.needs_input_grad
        U = src.numel() // C
        g_x = g_z.new_zeros(ctx.N, A.shape[-1]) if need[0] else None
        g_A = torch.zeros_like(A) if need[1] else None
        for u0, u1 in _chunks(head, U, G):
            rows = src[u0 * C:u1 * C]
            if g_x is not None:  # (g, C, d_in) = g_z^T @ A_u, scattered to the tokens
                g_x.index_add_(0, rows, torch.bmm(g_z[u0:u1].transpose(1, 2), _w(A, head, tail, u0, u1))
                               .view(-1, A.shape[-1]))
            if g_A is not None:  # gathered again: the packed input is not kept
                buf = xf.index_select(0, rows).view(u1 - u0, C, -1)
                _add(g_A, torch.bmm(g_z[u0:u1], buf), head, tail, u0, u1)
        return g_x, g_A, None, None, None, None, None


class _GroupedUp(torch.autograd.Function):
    """into[src[j]] += (((z_u * s_u)^T @ B_u)[j] over the U*C slots j of the blocks u: the token dispatch's
    second grouped matmul and its scatter back to the N token rows, added in place into `into` (N, d_out),
    the base projection's output, so the LoRA delta never exists as a tensor of its own (no zeroed
    (N, d_out) buffer, no separate add: about 2% of a MiniLM forward at E=32).

    z (U, R, C) from `_GroupedDown`, Bw (E, R, d_out) the experts' up projections, s (U, R, C) scaling x
    gate weight, src, head, tail and G as there. Each chunk's slot outputs are added to their tokens' rows
    while they are in cache. Backward keeps the same shapes (d z = Bw @ gy^T, not gy @ Bw^T with an output
    of R = 8 columns). Together with `_GroupedDown` equal to the dense bank within float rounding
    (tests/experts/test_token_dispatch.py compares values and gradients)."""

    @staticmethod
    def forward(ctx, into, z, Bw, s, src, head, tail, G):
        U, R, C = s.shape
        d_out = Bw.shape[-1]
        out2 = into.view(-1, d_out)
        for u0, u1 in _chunks(head, U, G):
            y = torch.bmm((z[u0:u1] * s[u0:u1]).transpose(1, 2), _w(Bw, head, tail, u0, u1))  # (g, C, d_out)
            out2.index_add_(0, src[u0 * C:u1 * C], y.view(-1, d_out))
        need = ctx.needs_input_grad
        ctx.head, ctx.G = head, G
        ctx.save_for_backward(Bw, s, z if need[2] or need[3] else None, src, tail)
        ctx.mark_dirty(into)
        return into

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        Bw, s, z, src, tail = ctx.saved_tensors
        head, G, (U, R, C) = ctx.head, ctx.G, s.shape
        need = ctx.needs_input_grad
        g2 = g_out.reshape(-1, g_out.shape[-1])
        g_z = torch.empty_like(s) if need[1] else None
        g_B = torch.zeros_like(Bw) if need[2] else None
        g_s = torch.empty_like(s) if need[3] else None
        for u0, u1 in _chunks(head, U, G):
            gy = g2.index_select(0, src[u0 * C:u1 * C]).view(u1 - u0, C, -1)  # (g, C, d_out)
            g_zs = torch.bmm(_w(Bw, head, tail, u0, u1), gy.transpose(1, 2))  # (g, R, C)
            if g_s is not None:
                g_s[u0:u1] = g_zs * z[u0:u1]
            if g_z is not None:
                g_z[u0:u1] = g_zs * s[u0:u1]
            if g_B is not None:
                _add(g_B, torch.bmm(z[u0:u1] * s[u0:u1], gy), head, tail, u0, u1)
        return (g_out if need[0] else None,  # the base output passes through
                g_z, g_B, g_s, None, None, None, None)


warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
# torch says this once per process when the first CSR tensor is made (the token dispatch's `_csr`); the CSR
# operations the dispatch uses (sampled_addmm, CSR @ dense on CPU) are tested against the dense bank here.


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The (len(crow) - 1, n_cols) CSR matrix of a `_CsrPlan` pattern with these values (valid by construction:
    each row's columns ascending and distinct, so torch's invariant checks are skipped)."""
    return torch.sparse_csr_tensor(crow, col, values, size=(crow.numel() - 1, n_cols), check_invariants=False)


def _sddmm(a: torch.Tensor, b: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The values of a @ b^T at the pattern's entries only (a (N, d), b (n_cols, d)): torch's sampled
    dense-dense matmul, in the pattern's order."""
    mask = _csr(crow, col, a.new_zeros(col.numel()), b.shape[0])
    return torch.sparse.sampled_addmm(mask, a, b.t(), beta=0.0).values()


class _CsrPlan:
    """Token dispatch as sparse rows (the CPU kernel, `LoraBank.kernel`): token t's K selected experts in
    ascending order `idx` (N, K), their gate weights `w` (N, K) (differentiable in the gates), and for a
    bank whose experts are `width` ranks wide the CSR pattern of the (N, E*width) matrix with token t's
    K*width columns (`pattern`, made once per width and kept: q, k, v joined are one width, a projection of
    another rank another)."""

    __slots__ = ("idx", "w", "_patterns")

    def __init__(self, idx: torch.Tensor, w: torch.Tensor):
        self.idx, self.w = idx, w
        self._patterns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pattern(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._patterns.get(width)
        if got is None:
            N, K = self.idx.shape
            dev = self.idx.device
            col = (self.idx.unsqueeze(-1) * width + torch.arange(width, device=dev)).reshape(-1)  # (N*K*width,)
            crow = torch.arange(0, N * K * width + 1, K * width, device=dev)
            got = self._patterns[width] = (crow, col)
        return got


class _CsrDown(torch.autograd.Function):
    """z = x A^T at the plan's columns only: token t's K selected experts' rank activations, a sampled
    dense-dense matmul (`torch.sparse.sampled_addmm`, SDDMM) with no sort and no padding. xf (N, d_in),
    A (E*W, d_in) the experts' rows side by side (W = R, or the summed ranks of projections done together),
    crow/col the plan's pattern for width W. Returns the N*K*W values in the pattern's order (token-major,
    then expert, then rank). Backward: dx = Gz A and dA = Gz^T x with Gz the CSR matrix of the incoming
    gradient (CSR @ dense)."""

    @staticmethod
    def forward(ctx, xf, A, crow, col):
        z = _sddmm(xf, A, crow, col)
        ctx.save_for_backward(xf if ctx.needs_input_grad[1] else None, A, crow, col)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_z):
        xf, A, crow, col = ctx.saved_tensors
        need = ctx.needs_input_grad
        G = _csr(crow, col, g_z.contiguous(), A.shape[0])
        return (torch.mm(G, A) if need[0] else None,
                torch.mm(G.t(), xf) if need[1] else None, None, None)


class _CsrUp(torch.autograd.Function):
    """into += S B^T with S the (N, E*R) CSR matrix of the gated, scaled rank activations v (N*K*R values in
    the plan's pattern): each token's K experts' up projections summed straight into its row of the base
    projection's output (CSR @ dense, no scatter). Bt (E*R, d_out) is B's rows. Backward: dv = (g Bt^T) at
    the pattern (SDDMM), dBt = S^T g."""

    @staticmethod
    def forward(ctx, into, v, Bt, crow, col):
        into.view(-1, Bt.shape[1]).addmm_(_csr(crow, col, v, Bt.shape[0]), Bt)
        ctx.mark_dirty(into)
        ctx.save_for_backward(Bt, crow, col, v if ctx.needs_input_grad[2] else None)
        return into

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        Bt, crow, col, v = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = g_out.reshape(-1, Bt.shape[1])
        g_v = g_B = None
        if need[1]:
            g_v = _sddmm(g2, Bt, crow, col)
        if need[2]:
            g_B = torch.mm(_csr(crow, col, v, Bt.shape[0]).t(), g2)
        return g_out, g_v, g_B, None, None


def _most_selected(gates: torch.Tensor) -> int:
    """The most non-zero gates any token (or row) has; 0 for gates of no token."""
    return int((gates != 0).sum(-1).max().item()) if gates.numel() else 0


def addable(into: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a bank may add its delta for input x into `into` in place: same dtype and device as the
    delta, contiguous rows, and not a leaf that takes gradients (autograd refuses in-place changes to
    those); otherwise the bank returns into + delta as a new tensor."""
    rows = into.shape[:-1] == x.shape[:-1] or (into.dim() == 2 and into.shape[0] == x.shape[:-1].numel())
    return (into.dtype == x.dtype and into.device == x.device and into.is_contiguous() and rows
            and not (into.requires_grad and into.is_leaf))


def _plus(into: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """into + delta in place in `into` (its rows may be x's leading dims flattened: RoutedLinear's)."""
    return delta if into is None else into.add_(delta.reshape(into.shape))


def block_layout(counts: torch.Tensor, floor: int = 4, block_cost: int = 4, gather_cost: int = 8) -> tuple[int, bool]:
    """The block size C and layout that pack experts with these token counts into the least work.

    Two layouts, for a block size C:
    - in place (True): expert e's first C tokens fill block e, read with the bank's weights as they are;
      its further tokens fill blocks of C after the E in-place ones, whose weights are gathered.
      An expert without tokens still takes its (empty) block.
    - packed (False): each expert with n tokens takes ceil(n / C) blocks, every one gathered; experts
      without tokens take none (a skewed router using few of many experts).
    The cost of a layout is its padded slots, plus `block_cost` slots' worth per block (a batched matmul
    of many small problems), plus `gather_cost` per gathered block (copying R * (d_in + d_out) weights).
    C is searched among powers of two from `floor` up to the largest count, and the largest count.

    floor 4 and block_cost 4 from a one-off whole-model timing, not a bench table (MiniLM, 16 x 128
    tokens, token-gate k=2 with one gate per block, random gates, one CPU thread); tuned on CPU only (no
    CUDA timing yet). At E=512 about 350 to 512 experts share 4,096 assignments, and blocks of 16 padded
    half the slots. gather_cost 8 is not a timing: on CPU the two layouts ran within the noise of each
    other (E = 8 to 512, same one-off setup, +-3%); the in-place layout is there for memory, since the
    gathered weights are saved for backward: activations saved at E=512 fell 30% (MiniLM 659 -> 458 MiB,
    Llama-shaped 915 -> 650; bench/routing.py --part speed --gate block), and on a GPU the copies are
    pure memory traffic."""
    top = int(counts.max().item())
    E = counts.numel()
    cands = [c for c in (1 << i for i in range(floor.bit_length() - 1, top.bit_length())) if c < top] + [max(top, floor)]
    cand = torch.tensor(cands, device=counts.device)[:, None]  # (n_cand, 1)
    packed = ((counts[None, :] + cand - 1) // cand).sum(1)  # (n_cand,) blocks, all gathered
    over = ((counts[None, :] - cand).clamp(min=0) + cand - 1).div(cand, rounding_mode="floor").sum(1)  # gathered
    cost_packed = packed * (cand[:, 0] + block_cost + gather_cost)
    cost_place = (E + over) * (cand[:, 0] + block_cost) + over * gather_cost
    i_p, i_q = int(cost_packed.argmin().item()), int(cost_place.argmin().item())
    if cost_place[i_q] <= cost_packed[i_p]:
        return cands[i_q], True
    return cands[i_p], False


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

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None, *, dense_gate_grad: bool = False,
                plans: dict | None = None, topk: torch.Tensor | None = None,
                into: torch.Tensor | None = None, group: Sequence["LoraBank"] = ()) -> torch.Tensor:
        """x (..., d_in), gates (..., S) broadcastable to x's leading dims, S in {E, E*R} -> (..., d_out).

        `into` (..., d_out): a tensor the delta is added to (the base projection's output); the result is
        then into + delta, computed in place in `into` where that is safe (`addable`), so RoutedLinear
        does not allocate the delta and a sum of it.

        `dense_gate_grad`: the caller needs d loss / d gates on the unselected (zero) slots too (a
        straight-through gate such as LoRA-Mixer's); "auto" then keeps the dense path while gradients
        flow into the gates, since the sparse path only computes the selected experts. `plans`: a dict
        that lives as long as `gates` (the Routing's), where the token dispatch keeps its plan so banks
        fed by the same gates sort the tokens once. `topk` (..., K): the experts the router selected per
        token (the Routing's `topk_idx`, every non-zero gate among them); the token dispatch then takes
        them as they are instead of searching the (..., E) gates again, so nothing on its path reads all
        E gates of a token. `group`: other banks that this forward feeds the very same input with the same
        gates (`experts/layers.link_same_input`); the token dispatch does their down projections together.
        """
        if into is not None and not addable(into, x):
            return into + self.forward(x, gates, dense_gate_grad=dense_gate_grad, plans=plans, topk=topk,
                                       group=group).to(into.dtype).reshape(into.shape)
        if self.sparse and self._sequence_gates(x, gates):
            k = _most_selected(gates)
            if 2 * k <= self.n_experts:
                return _plus(into, self._forward_selected(x, gates, k))
        elif self._token_gates(x, gates) and self.dispatch != "dense":
            if topk is not None and topk.shape[:-1] == gates.shape[:-1]:
                k = topk.shape[-1]
            else:
                topk, k = None, max(1, _most_selected(gates))
            needs_all = dense_gate_grad and gates.requires_grad and torch.is_grad_enabled()
            if self.dispatch == "sparse" or (self.sparse_factor(x) * k <= self.n_experts and not needs_all):
                return self._forward_tokens(x, gates, k, plans, topk, into, group)
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
        return _plus(into, F.linear(z, self.B))  # (..., d_out)

    kernel = "auto"
    """The token dispatch's kernel: "auto" | "csr" | "grouped" (`_uses_csr`); set on a bank, or on the class."""

    SPARSE_FACTOR = 16
    """auto with the grouped kernel: sparse when E*R >= SPARSE_FACTOR * K*R. Measured per MiniLM projection
    (2048 tokens, R=8, k=2, 2 CPU threads, the heap kept by loraplex/allocator.py): dense 3.1 ms against
    sparse 4.1 ms at E=16, dense 5.2 ms against sparse 3.6 ms at E=32, and 117 ms against 9.7 ms at E=512
    (the dense inner size E*R grows, the sparse path's stays k*R); bench/routing.py --part speed has the
    model-level table."""

    CSR_FACTOR = 4
    """auto with the csr kernel: sparse when E >= CSR_FACTOR * K. Per MiniLM projection (2,048 tokens, R=8,
    one thread, frozen adapters, a one-off timing), dense against csr, forward and forward+backward: k=2
    E=4 1.2/3.8 ms against 1.5/5.0 (dense wins), E=8 2.5/6.7 against 1.6/5.7, E=16 4.7/12.1 against
    1.7/5.3; k=1 E=4 1.2/4.6 against 0.9/4.7 (even)."""

    def sparse_factor(self, x: torch.Tensor) -> int:
        """auto's break-even E/K for input x: the kernel's (CSR_FACTOR or SPARSE_FACTOR)."""
        return self.CSR_FACTOR if self._uses_csr(x) else self.SPARSE_FACTOR

    def _token_gates(self, x: torch.Tensor, gates: torch.Tensor | None) -> bool:
        """Per-adapter gates given per token: (..., E) with the leading dims of x."""
        if self.dispatch not in ("auto", "dense", "sparse"):
            raise ValueError(f"dispatch must be 'auto', 'dense' or 'sparse', got {self.dispatch!r}")
        if self.kernel not in ("auto", "csr", "grouped"):
            raise ValueError(f"kernel must be 'auto', 'csr' or 'grouped', got {self.kernel!r}")
        return (gates is not None and gates.shape[-1] == self.n_experts and self.n_experts > 1
                and gates.shape[:-1] == x.shape[:-1])

    def _uses_csr(self, x: torch.Tensor) -> bool:
        """Which kernel the token dispatch runs for input x: "csr" (sparse rows: `_CsrDown`, `_CsrUp`) or
        "grouped" (tokens sorted into blocks: `_GroupedDown`, `_GroupedUp`); "auto" takes csr on CPU in
        float32/float64 while neither A nor B takes gradients in this forward (inference, routers trained over
        frozen adapters), grouped otherwise. Why: on CPU torch's SDDMM and CSR @ dense cost the same at E=32
        and E=512 and need no sort, padding or scatter (per MiniLM projection, 2,048 tokens, k=2, one thread:
        0.6 ms + 1.0 ms at either E, against the grouped kernel's 1.5 ms at E=32 and 2.9 ms at E=512, a one-off
        timing; bench/routing.py --part speed has both kernels side by side), but the adapters' own gradients
        need S^T @ dense, which torch runs 5-8x slower than the grouped kernel's bmm at E=512 (joint training
        keeps grouped). Off CPU (CUDA: cuSPARSE's SDDMM and SpMM, untimed here) auto keeps grouped."""
        if self.kernel != "auto":
            return self.kernel == "csr"
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not (torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)))

    def _csr_plan(self, gates: torch.Tensor, k: int, plans: dict | None, topk: torch.Tensor | None = None) -> _CsrPlan:
        """The csr kernel's plan for these gates (shared through `plans` as `_token_plan`'s is): each token's
        K experts in ascending order and their gate weights."""
        key = ("csr", self.n_experts, k)
        if plans is not None and key in plans:
            return plans[key]
        gf = gates.reshape(-1, self.n_experts)  # (N, E)
        idx = topk.reshape(-1, k) if topk is not None else gf.detach().abs().topk(k, dim=-1).indices  # (N, K)
        idx = idx.sort(-1).values  # a CSR row's columns ascend
        plan = _CsrPlan(idx, gf.gather(-1, idx))
        if plans is not None:
            plans[key] = plan
        return plan

    def _token_plan(self, gates: torch.Tensor, k: int, plans: dict | None, topk: torch.Tensor | None = None) -> _TokenPlan:
        """Where each (token, expert) assignment goes: built once per gates tensor and k, and shared
        through `plans` (the Routing's cache) by every bank of E experts those gates feed. `topk`: the
        router's selection (N.., K), used as the assignments instead of a top-k over |gates|."""
        key = ("plan", self.n_experts, k)
        if plans is not None and key in plans:
            return plans[key]
        E = self.n_experts
        gf = gates.reshape(-1, E)  # (N, E)
        N, dev = gf.shape[0], gf.device
        idx = topk.reshape(N, k) if topk is not None else gf.detach().abs().topk(k, dim=-1).indices  # (N, K)
        flat_e = idx.reshape(-1)  # (N*K,) assignments, token-major
        order = torch.argsort(flat_e, stable=True)  # assignments sorted by expert
        counts = torch.bincount(flat_e, minlength=E)  # (E,)
        C, in_place = block_layout(counts)
        e_sorted = flat_e[order]
        pos = torch.arange(flat_e.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[e_sorted]  # rank within its expert
        arange_e = torch.arange(E, device=dev)
        if in_place:  # block e holds expert e's first C; its further ones go to gathered blocks after the E
            more = (counts - C).clamp(min=0).add(C - 1).div(C, rounding_mode="floor")  # (E,) further blocks
            first_more = E + torch.cumsum(more, 0) - more  # (E,)
            block = torch.where(pos < C, e_sorted, first_more[e_sorted] + (pos - C).clamp(min=0) // C)
            head, tail = E, torch.repeat_interleave(arange_e, more)
        else:
            blocks = (counts + C - 1) // C  # (E,) blocks per expert
            block = (torch.cumsum(blocks, 0) - blocks)[e_sorted] + pos // C
            head, tail = 0, torch.repeat_interleave(arange_e, blocks)
        U = head + tail.numel()
        tail = tail if tail.numel() else None
        slot_sorted = block * C + pos % C
        slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # (N*K,) buffer slot of assignment j
        # the token filling each buffer slot; padding slots read token 0, weigh 0 and so add 0 to its row
        src = torch.zeros(U * C, dtype=torch.long, device=dev).scatter_(0, slot, torch.arange(N * k, device=dev) // k)
        w = gf.gather(-1, idx).reshape(-1)  # (N*K,) gate weights, differentiable in the gates
        w_slot = w.new_zeros(U * C).scatter(0, slot, w)  # (U*C,) zero on padding
        plan = _TokenPlan(head, tail, U, C, src, w_slot)
        if plans is not None:
            plans[key] = plan
        return plan

    def _forward_tokens(self, x: torch.Tensor, gates: torch.Tensor, k: int, plans: dict | None = None,
                        topk: torch.Tensor | None = None, into: torch.Tensor | None = None,
                        group: Sequence["LoraBank"] = ()) -> torch.Tensor:
        """Token-level sparse dispatch: each token computes only its k selected adapters.

        The N*K assignments (token, expert) are sorted by expert (`_token_plan`, once per gates tensor:
        projections fed by one shared gate reuse it), each expert's tokens are laid out in blocks of C
        slots, and chunk by chunk of blocks their rows are gathered (G, C, d_in) and multiplied by the
        experts' A (`_GroupedDown`, inner size R, as CPU MoE kernels do), then the gate weights multiply
        the rank-R activations, a second grouped matmul applies B and `index_add_` adds every slot's row
        to its token (`_GroupedUp`; padding slots weigh 0). `group`: banks that take this very input too
        (q, k and v: `experts/layers.link_same_input`), whose down projections are done with this one's
        (`_down`). Differentiable in x, A, B and the gates. Equal to the dense path
        (tests/experts/test_token_dispatch.py).
        """
        E, R = self.n_experts, self.rank
        lead = x.shape[:-1]
        if lead.numel() == 0:  # no token: nothing to add (the grouped plan has no block to shape)
            return into if into is not None else x.new_zeros(*lead, self.d_out)
        if self._uses_csr(x):
            p = self._csr_plan(gates.to(x.dtype), k, plans, topk)
            z = self._down(x, p, plans, group)  # (N, K, R)
            v = z * (self.rank_scale().view(E, R).to(x.dtype)[p.idx] * p.w.unsqueeze(-1))  # scaling x gate weight
            if into is None:
                into = x.new_zeros(*lead, self.d_out)
            crow, col = p.pattern(R)
            return _CsrUp.apply(into, v.reshape(-1), self._b_rows(x.dtype).view(E * R, self.d_out), crow, col)
        p = self._token_plan(gates.to(x.dtype), k, plans, topk)
        z = self._down(x, p, plans, group)  # (U, R, C)
        Bw = self._b_rows(x.dtype)  # (E, R, d_out)
        scale = self.rank_scale().view(E, R)
        if p.tail is not None:
            scale = torch.cat([scale] * bool(p.head) + [scale.index_select(0, p.tail)])  # (U, R)
        s_ = scale.to(x.dtype).unsqueeze(-1) * p.w_slot.view(p.U, 1, p.C)  # (U, R, C) scaling x gate weight
        if into is None:
            into = x.new_zeros(*lead, self.d_out)
        G = chunk_blocks(x.device, p.C, self.d_out, x.element_size())
        return _GroupedUp.apply(into, z, Bw, s_, p.src, p.head, p.tail, G)  # each slot's row added to its token's

    def _drops(self) -> bool:
        """Whether this forward applies dropout to the input (each projection then draws its own mask)."""
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training

    def _joins(self, lead: "LoraBank", x: torch.Tensor) -> bool:
        """Whether this bank's down projection for input x can be computed in one matmul with `lead`'s (same
        experts, input width, dtype, device, dispatch and kernel; no dropout)."""
        return (self.n_experts == lead.n_experts and self.d_in == lead.d_in
                and self.A.dtype == lead.A.dtype and self.A.device == lead.A.device
                and self.dispatch == lead.dispatch and self._uses_csr(x) == lead._uses_csr(x) and not self._drops())

    def _down(self, x: torch.Tensor, p: _TokenPlan | _CsrPlan, plans: dict | None, group: Sequence["LoraBank"]) -> torch.Tensor:
        """This bank's z = A x over plan p's blocks (U, R, C), or its tokens' experts (N, K, R) for the csr
        kernel's plan. Projections that take the same input (q, k, v)
        share one gather of its rows and one matmul over their A side by side: the first of them to run
        computes the others' z too and leaves it in `plans` (the Routing's cache, which lives for this
        forward), keyed by bank and checked against the very input tensor and plan, so a projection called
        on another input computes its own. On CPU this took the q, k, v down projections of a MiniLM layer
        from 4.7 to 2.9 ms (C=128) and 11.2 to 6.7 ms (C=8) in a one-off timing (one thread, 2,048 tokens,
        k=2): one gather instead of three, and a matmul of 3R rows runs faster per row than three of R."""
        if plans is not None:
            kept = plans.pop(("down", id(self)), None)
            if kept is not None and kept[0]() is x and kept[1] is p:
                return kept[2]
        banks = [self]
        if plans is not None and not self._drops():
            banks += [b for b in group if isinstance(b, LoraBank) and b is not self and b._joins(self, x)]
        xf = self.dropout(x).reshape(-1, self.d_in)
        A = self._a_rows(banks, x.dtype)  # (E, W, d_in), W the banks' ranks summed
        if isinstance(p, _CsrPlan):
            W = A.shape[1]
            z = _CsrDown.apply(xf, A.reshape(-1, self.d_in), *p.pattern(W)).view(*p.idx.shape, W)  # (N, K, W)
        else:
            G = chunk_blocks(x.device, p.C, self.d_in, x.element_size())
            z = _GroupedDown.apply(xf, A, p.src, p.head, p.tail, G, p.C)  # (U, W, C)
        if len(banks) == 1:
            return z
        dim = 2 if isinstance(p, _CsrPlan) else 1  # the rank dimension
        off = self.rank
        for b in banks[1:]:  # not kept alive by the cache
            plans[("down", id(b))] = (weakref.ref(x), p, z.narrow(dim, off, b.rank))
            off += b.rank
        return z.narrow(dim, 0, self.rank)

    def _a_rows(self, banks: Sequence["LoraBank"], dtype: torch.dtype) -> torch.Tensor:
        """The banks' A as (E, sum of ranks, d_in), side by side (one bank: its own A as a view). While no A
        takes gradients in this forward the joined copy is kept on this bank and reused until one of them
        changes (their version counters); it costs their A's size once more."""
        E, d = self.n_experts, self.d_in
        if len(banks) == 1:
            return self.A.view(E, self.rank, d).to(dtype)
        join = lambda: torch.cat([b.A.view(E, b.rank, d) for b in banks], 1).to(dtype)
        if torch.is_grad_enabled() and any(b.A.requires_grad for b in banks):
            return join()
        return self._kept("_a_kept", (tuple((id(b), b.A.data_ptr(), tensor_version(b.A)) for b in banks), dtype), join)

    def _kept(self, slot: str, key: tuple, make) -> torch.Tensor:
        """The copy kept in `slot` while its `key` (the sources' storage and version counters) is unchanged,
        else made anew by `make()` and kept."""
        kept = self.__dict__.get(slot)
        if kept is None or kept[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: later grad-mode forwards may save it
                kept = (key, make())
            self.__dict__[slot] = kept
        return kept[1]

    def _b_rows(self, dtype: torch.dtype) -> torch.Tensor:
        """B as (E, R, d_out), contiguous: the layout the grouped matmuls read (a bmm reading the permuted
        view of the (d_out, E*R) parameter is several times slower). While B takes no gradient in this
        forward (router training over frozen adapters, inference) the copy is kept and reused until B
        changes (its version counter): at E=512 the copy is 1.5M values per MiniLM projection, about 1 ms
        a projection when made anew every forward. The kept copy costs B's size once more."""
        B = self.B
        rows = lambda: B.view(self.d_out, self.n_experts, self.rank).permute(1, 2, 0).to(dtype).contiguous()
        if torch.is_grad_enabled() and B.requires_grad:
            return rows()
        return self._kept("_b_kept", (B.data_ptr(), tensor_version(B), dtype, B.device), rows)

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
