"""LSQ+ fake quantization of embedding rows with one step per candidate bit-width.

For a row quantized at b >= 1 bits (signed range for every b, DESIGN section 3)::

    a_b    = |alpha_b| + 1e-10
    code   = clamp(round((w - beta) / a_b), -2^(b-1), 2^(b-1) - 1)
    q_b(w) = code * a_b + beta

``alpha`` [|B|] is shared by the whole table (one step per candidate), ``beta`` [D] is one
offset vector shared by the table. Gradients follow LSQ+ with the straight-through
rounding of the reference code (``lsq_plus`` in Leopold1423/mpe ``model/embedding.py``):

- w:     dy inside the clamp range, 0 outside;
- a_b:   dy * (round(x) - x) inside, dy * bound outside, times the LSQ grad scale;
- beta:  0 inside, dy outside, times the same grad scale;

with the grad scale ``1 / sqrt(2^(b-1)) / sqrt(num_rows * D)`` of the row's bit-width.
"Inside" is ``low <= x <= high`` on the unrounded ``x = (w - beta) / a_b``, as in the
reference. The forward value is computed as ``code * a_b + beta`` in float32 with exactly
the operations ``dequantize`` uses, so a stored code reproduces it bit for bit.

b = 0 (pruned row): the output is the exact zero vector (not beta) and no gradient flows
to w, alpha or beta from that row. The reference does the same: its mixture loop skips
``bit == 0`` (``if bit == 0: continue``), so a pruned row contributes zeros. The packed
export stores zero bytes for such rows and its loader returns zeros: all three agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from encoding.sizes import code_range
from mpe.bitwidths import DEFAULT_CANDIDATES, validate_candidates

STEP_EPS = 1e-10
ESTIMATORS = ("st", "score")


def _dequant(code: Tensor, step: Tensor, offset: Tensor) -> Tensor:
    """``code * step + offset`` in float32: the one expression used by the quantizer, the
    dequantizer and the packed loader (so their results are bit-identical)."""
    return code * step + offset


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and grad.shape[i] != 1:
            grad = grad.sum(i, keepdim=True)
    return grad


class _LSQPlus(torch.autograd.Function):
    """q = where(keep, clamp(round((w - beta) / a), low, high) * a + beta, 0) with LSQ+ grads.

    Shapes: w [n, D]; a, low, high, gscale [n, 1] or [1, 1]; keep [n, 1] or [1, 1] bool;
    beta [D].
    """

    @staticmethod
    def forward(ctx, w, a, beta, low, high, keep, gscale):  # type: ignore[override]
        x = (w - beta) / a
        code = torch.clamp(torch.round(x), low, high)
        q = torch.where(keep, _dequant(code, a, beta), torch.zeros((), dtype=w.dtype))
        ctx.save_for_backward(x, a, beta, low, high, keep, gscale)
        return q

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, a, beta, low, high, keep, gscale = ctx.saved_tensors
        dy = torch.where(keep, dy, torch.zeros((), dtype=dy.dtype))
        small, big = x < low, x > high
        middle = ~(small | big)
        dw = torch.where(middle, dy, torch.zeros((), dtype=dy.dtype)) if ctx.needs_input_grad[0] else None
        da = dbeta = None
        if ctx.needs_input_grad[1]:
            slope = torch.where(small, low, torch.where(big, high, torch.round(x) - x))
            da = _sum_to((slope * dy).sum(1, keepdim=True) * gscale, a.shape)
        if ctx.needs_input_grad[2]:
            dbeta = _sum_to(torch.where(middle, torch.zeros((), dtype=dy.dtype), dy) * gscale, beta.shape)
        return dw, da, dbeta, None, None, None, None


class _MixedLSQPlus(torch.autograd.Function):
    """out = sum_j probs[:, j] * q_j(w) over candidates j (steps[j], bounds low/high[j]) in one
    function: the gradients of ``_LSQPlus`` for every candidate, plus d/dprobs, without
    autograd keeping |B| sets of intermediates (the backward recomputes them).

    Shapes: w [n, D]; steps, low, high, gscale [J]; beta [D]; probs [n, J].
    """

    @staticmethod
    def forward(ctx, w, steps, beta, probs, low, high, gscale):  # type: ignore[override]
        d = w - beta
        out = torch.zeros_like(w)
        for j in range(steps.numel()):
            code = torch.clamp(torch.round(d / steps[j]), low[j], high[j])
            out.add_(_dequant(code, steps[j], beta) * probs[:, j : j + 1])
        ctx.save_for_backward(d, steps, beta, probs, low, high, gscale)
        return out

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        d, steps, beta, probs, low, high, gscale = ctx.saved_tensors
        dw, dbeta = torch.zeros_like(d), torch.zeros_like(beta)
        dsteps, dprobs = torch.zeros_like(steps), torch.empty_like(probs)
        for j in range(steps.numel()):
            x = d / steps[j]
            r = torch.round(x)
            code = torch.clamp(r, low[j], high[j])
            dprobs[:, j] = (dy * _dequant(code, steps[j], beta)).sum(1)
            dq = dy * probs[:, j : j + 1]
            inside = (x >= low[j]) & (x <= high[j])
            dw += dq * inside
            slope = torch.where(inside, r - x, code)  # outside: the clamped bound
            dsteps[j] = (slope * dq).sum() * gscale[j]
            dbeta += (dq * ~inside).sum(0) * gscale[j]
        return dw, dsteps, dbeta, dprobs, None, None, None


def gumbel_like(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise with the shape of ``logits``."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    tiny = torch.finfo(logits.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


class LSQQuantizer(nn.Module):
    """LSQ+ quantizer of a table's rows with one learnable step per candidate bit-width.

    Args:
        candidates: candidate bit-widths B (0 = pruned row).
        dim: embedding dimension D.
        num_rows: rows N of the whole table (for the LSQ gradient scale).

    Parameters: ``alpha`` [|B|] (steps, used as ``|alpha| + 1e-10``), ``beta`` [D] (offset,
    zero-initialised). Buffers: ``bits`` [|B|], ``low``/``high`` [|B|] code bounds,
    ``grad_scale`` [|B|].
    """

    def __init__(self, candidates: Sequence[int] = DEFAULT_CANDIDATES, dim: int = 16, num_rows: int = 1):
        super().__init__()
        self.candidates = validate_candidates(candidates)
        if dim < 1 or num_rows < 1:
            raise ValueError(f"dim and num_rows must be positive, got {dim}, {num_rows}")
        self.dim, self.num_rows = int(dim), int(num_rows)
        bounds = [code_range(b) for b in self.candidates]
        levels = torch.tensor([2.0 ** (b - 1) for b in self.candidates], dtype=torch.float64)
        self.register_buffer("bits", torch.tensor(self.candidates, dtype=torch.int64))
        self.register_buffer("low", torch.tensor([lo for lo, _ in bounds], dtype=torch.float32))
        self.register_buffer("high", torch.tensor([hi for _, hi in bounds], dtype=torch.float32))
        self.register_buffer(
            "grad_scale", (1.0 / levels.sqrt() / math.sqrt(self.num_rows * self.dim)).to(torch.float32)
        )
        self.alpha = nn.Parameter(torch.ones(len(self.candidates)))
        self.beta = nn.Parameter(torch.zeros(self.dim))

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def bit_index(self, bits: int) -> int:
        """Candidate index of a bit value."""
        try:
            return self.candidates.index(int(bits))
        except ValueError:
            raise ValueError(f"{bits} bits is not among the candidates {self.candidates}") from None

    @torch.no_grad()
    def init_steps(self, weight: Tensor) -> None:
        """alpha_b = 2 mean|W| / sqrt(2^(b-1)) from the table ``weight`` [N, D] (LSQ init)."""
        mean_abs = weight.detach().abs().mean().to(torch.float64)
        levels = torch.tensor([2.0 ** (b - 1) for b in self.candidates], dtype=torch.float64)
        self.alpha.copy_((2 * mean_abs / levels.sqrt()).to(self.alpha.dtype))

    def steps(self) -> Tensor:
        """float [|B|]: the effective steps ``|alpha| + 1e-10`` (differentiable)."""
        return self.alpha.abs() + STEP_EPS

    # -- deterministic quantization -----------------------------------------------------
    def _rows(self, bit_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        idx = bit_index.reshape(-1, 1)
        a = self.steps().index_select(0, idx.reshape(-1)).view(-1, 1)  # deterministic backward
        return a, self.low[idx], self.high[idx], self.bits[idx] > 0, self.grad_scale[idx]

    def _check(self, w: Tensor) -> None:
        if w.dim() != 2 or w.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape [n, {self.dim}], got {tuple(w.shape)}")

    def quantize_per_row(self, w: Tensor, bit_index_per_row: Tensor) -> Tensor:
        """Tensor[n, D]: row i quantized at candidate ``bit_index_per_row[i]`` (LongTensor[n]).

        One pass over the rows with per-row step, bounds and grad scale gathered by index
        (no |B|-fold work). Rows at 0 bits are exact zeros.
        """
        self._check(w)
        if bit_index_per_row.shape != (w.shape[0],):
            raise ValueError(f"bit_index_per_row has shape {tuple(bit_index_per_row.shape)}, expected ({w.shape[0]},)")
        a, low, high, keep, gscale = self._rows(bit_index_per_row.to(torch.int64))
        return _LSQPlus.apply(w, a, self.beta, low, high, keep, gscale)

    def quantize(self, w: Tensor, bit_index: int) -> Tensor:
        """Tensor[n, D]: all rows of ``w`` [n, D] quantized at candidate ``bit_index``."""
        self._check(w)
        i = int(bit_index)
        if not 0 <= i < self.num_candidates:
            raise IndexError(f"bit index {i} outside 0..{self.num_candidates - 1}")
        idx = torch.tensor([i], device=w.device)
        a, low, high, keep, gscale = self._rows(idx)
        return _LSQPlus.apply(w, a, self.beta, low, high, keep, gscale)

    def quantize_all(self, w: Tensor) -> Tensor:
        """Tensor[|B|, n, D]: ``w`` quantized at every candidate."""
        return torch.stack([self.quantize(w, i) for i in range(self.num_candidates)])

    def mix_expected(self, w: Tensor, probs: Tensor) -> Tensor:
        """Tensor[n, D] = sum_b probs[:, b] * q_b(w): the reference code's search forward.

        ``probs`` [n, |B|] (each row's distribution over candidates). The b = 0 term is
        zero and skipped, as in the reference.
        """
        self._check(w)
        if probs.shape != (w.shape[0], self.num_candidates):
            raise ValueError(f"probs has shape {tuple(probs.shape)}, expected ({w.shape[0]}, {self.num_candidates})")
        used = [i for i, b in enumerate(self.candidates) if b > 0]
        if not used:
            return torch.zeros_like(w) + 0 * probs.sum()
        idx = torch.tensor(used, device=w.device)
        return _MixedLSQPlus.apply(w, self.steps().index_select(0, idx), self.beta, probs.index_select(1, idx),
                                   self.low.index_select(0, idx), self.high.index_select(0, idx),
                                   self.grad_scale.index_select(0, idx))

    def mix_sampled(
        self,
        w: Tensor,
        logits_per_row: Tensor,
        tau: float = 1.0,
        generator: torch.Generator | None = None,
        estimator: str = "score",
    ) -> Tensor:
        """Tensor[n, D]: one sampled bit-width per row, with gradients to the logits.

        Forward: k_i = argmax(logits_i + Gumbel noise), a sample of softmax(logits_i);
        the output is ``quantize_per_row(w, k)`` (one quantization per row; w, alpha and
        beta get their usual straight-through gradients through it).

        Backward to ``logits_per_row`` [n, |B|] (forward value unaffected), with
        e_i = (q_k(w_i) - w_i) detached and g_i = dL/dout_i:

        - ``"score"`` (default): out = q_k + (log p_k - sg(log p_k)) e with
          p = softmax(logits), so dL/dlogits = (g . e) dlog p_k/dlogits: a score-function
          estimator whose expectation over k ~ p is sum_b (g . (q_b - w)) dp_b/dlogits =
          sum_b (g . q_b) dp_b/dlogits, exactly the gradient ``mix_expected`` gives the
          logits (for the same g). Unbiased, so the size penalty lambda keeps the balance
          it has in the reference's expected mode; the per-row noise averages out over the
          many rows of a group in a batch (measured: the batch-averaged gradient matches
          the expected mode's to cosine 0.99999). ``tau`` is unused.
        - ``"st"`` (Gumbel-softmax straight-through): out = q_k + (y_k - sg(y_k)) e with
          y = softmax((logits + G) / tau), so dL/dlogits = (g . e) dy_k/dlogits: the full
          ST-GS gradient sum_b (g . q_b) dy_b/dlogits with the unsampled candidates' q_b
          replaced by w (which costs nothing). Right direction but biased: at tau = 1 its
          magnitude is about a quarter of the expected mode's, which shifts the balance
          against the size penalty.

        Neither computes more than one quantization per row.
        """
        self._check(w)
        if logits_per_row.shape != (w.shape[0], self.num_candidates):
            raise ValueError(
                f"logits_per_row has shape {tuple(logits_per_row.shape)}, expected ({w.shape[0]}, {self.num_candidates})"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
        gumbel = gumbel_like(logits_per_row, generator)
        k = (logits_per_row.detach() + gumbel).argmax(dim=1)
        q = self.quantize_per_row(w, k)
        if not logits_per_row.requires_grad:
            return q
        if estimator == "st":
            y = torch.softmax((logits_per_row + gumbel) / tau, dim=1)
        else:
            y = torch.log_softmax(logits_per_row, dim=1)
        yk = y.gather(1, k[:, None])
        return q + (yk - yk.detach()) * (q - w).detach()

    # -- integer codes ------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, w: Tensor, bit_index_per_row: Tensor) -> Tensor:
        """int8 [n, D]: the signed integer codes of ``quantize_per_row`` (0 for pruned rows)."""
        self._check(w)
        a, low, high, keep, _ = self._rows(bit_index_per_row.to(torch.int64))
        code = torch.clamp(torch.round((w - self.beta) / a), low, high)
        return torch.where(keep, code, torch.zeros((), dtype=code.dtype)).to(torch.int8)

    def dequantize(self, codes: Tensor, bit_index_per_row: Tensor) -> Tensor:
        """float [n, D]: ``codes * a_b + beta`` per row, zeros for pruned rows; equal bit for
        bit to ``quantize_per_row`` of the rows the codes came from."""
        a, _, _, keep, _ = self._rows(bit_index_per_row.to(torch.int64))
        out = _dequant(codes.to(a.dtype), a, self.beta)
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype))
