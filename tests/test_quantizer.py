"""LSQ+ quantizer: forward formula, integer codes, bit-exact dequantization, STE gradients."""

import math

import pytest
import torch

from encoding.sizes import bucket_code_bytes, code_range
from mpe.bitwidths import DEFAULT_CANDIDATES, threshold_probability, validate_candidates
from mpe.quantizer import LSQQuantizer, gumbel_like

CANDS = (0, 1, 2, 3, 4, 6, 8)


def make(n: int = 64, dim: int = 7, seed: int = 0, cands=CANDS) -> tuple[LSQQuantizer, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, dim, generator=g) * 0.01
    q = LSQQuantizer(cands, dim, num_rows=1000)
    q.init_steps(w)
    with torch.no_grad():
        q.beta.copy_(torch.randn(dim, generator=g) * 0.002)
    idx = torch.randint(0, len(cands), (n,), generator=g)
    return q, w, idx


def reference_autograd(q: LSQQuantizer, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """LSQ+ written with plain autograd (grad-scale trick, STE round, reference's clamp mask)."""
    s = q.grad_scale[idx][:, None]
    a = (q.alpha.abs() + 1e-10)[idx][:, None]
    a = a * s - (a * s).detach() + a.detach()
    beta = q.beta * s - (q.beta * s).detach() + q.beta.detach()
    x = (w - beta) / a
    r = x + (x.round() - x).detach()
    lo, hi = q.low[idx][:, None], q.high[idx][:, None]
    code = torch.where(x < lo, lo, torch.where(x > hi, hi, r))
    return torch.where(q.bits[idx][:, None] > 0, code * a + beta, torch.zeros(()))


def test_validate_candidates_and_facts():
    assert validate_candidates([3, 0, 3, 1]) == (0, 1, 3)
    assert validate_candidates(DEFAULT_CANDIDATES) == tuple(range(7))
    for bad in ([], [9], [-1], [1.5], [True], "ab", None):
        with pytest.raises(ValueError):
            validate_candidates(bad)
    assert threshold_probability(DEFAULT_CANDIDATES) == pytest.approx(1 / 14)
    assert code_range(1) == (-1, 0) and code_range(4) == (-8, 7) and code_range(0) == (0, 0)
    assert bucket_code_bytes(1, 3, 16) == 6 and bucket_code_bytes(8, 3, 7) == 21  # 21/8 bytes a row


def test_init_and_grad_scale():
    q, w, _ = make()
    mean = w.abs().mean()
    for i, b in enumerate(CANDS):
        assert q.alpha[i].item() == pytest.approx(2 * mean.item() / math.sqrt(2.0 ** (b - 1)), rel=1e-6)
        assert q.grad_scale[i].item() == pytest.approx(1 / math.sqrt(2.0 ** (b - 1)) / math.sqrt(1000 * 7), rel=1e-6)
    assert torch.equal(LSQQuantizer(CANDS, 7, 10).beta, torch.zeros(7))


def test_forward_formula_codes_and_bit_exact_dequantize():
    q, w, idx = make(n=500)
    out = q.quantize_per_row(w, idx)
    codes = q.codes(w, idx)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    for i, b in enumerate(CANDS):
        rows = idx == i
        lo, hi = code_range(b)
        assert codes[rows].min() >= lo and codes[rows].max() <= hi
        if b == 0:
            assert torch.equal(out[rows], torch.zeros_like(out[rows]))
            continue
        a = q.alpha.abs()[i] + 1e-10
        manual = torch.clamp(torch.round((w[rows] - q.beta) / a), lo, hi) * a + q.beta
        assert torch.equal(out[rows], manual)
        assert torch.equal(q.quantize(w[rows], i), out[rows])
    assert torch.equal(q.dequantize(codes, idx), out)
    assert q.quantize_all(w).shape == (len(CANDS), 500, 7)
    # every level is used at low bit-widths (the init step spans the weights)
    assert set(codes[idx == CANDS.index(2)].unique().tolist()) == {-2, -1, 0, 1}


def test_gradients_match_reference_lsq_plus():
    q, w, idx = make(n=200)
    g = torch.randn(200, 7, generator=torch.Generator().manual_seed(1))
    w1 = w.clone().requires_grad_()
    (q.quantize_per_row(w1, idx) * g).sum().backward()
    grads = (w1.grad.clone(), q.alpha.grad.clone(), q.beta.grad.clone())
    q.zero_grad()
    w2 = w.clone().requires_grad_()
    (reference_autograd(q, w2, idx) * g).sum().backward()
    torch.testing.assert_close(grads[0], w2.grad)
    torch.testing.assert_close(grads[1], q.alpha.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[2], q.beta.grad, rtol=1e-5, atol=1e-9)
    assert grads[1].abs()[1:].min() > 0 and grads[2].abs().sum() > 0
    assert grads[1][0] == 0  # the 0-bit step never gets a gradient


def test_weight_gradient_passes_inside_clamp_only():
    q = LSQQuantizer((0, 2), dim=4, num_rows=10)
    with torch.no_grad():
        q.alpha.fill_(1.0)
    # 2 bits: codes -2..1; x = w / 1
    w = torch.tensor([[0.3, -1.7, 1.4, 5.0], [0.3, -2.6, 1.6, -9.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    idx = torch.tensor([1, 1, 0])
    out = q.quantize_per_row(w, idx)
    assert out.tolist()[:2] == [[0.0, -2.0, 1.0, 1.0], [0.0, -2.0, 1.0, -2.0]]
    assert out[2].tolist() == [0.0] * 4  # pruned: exact zeros
    out.sum().backward()
    assert w.grad.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_mix_expected_is_weighted_sum():
    q, w, _ = make(n=50)
    probs = torch.softmax(torch.randn(50, len(CANDS), generator=torch.Generator().manual_seed(3)), dim=1)
    manual = torch.zeros_like(w)
    for i in range(len(CANDS)):
        manual = manual + q.quantize(w, i) * probs[:, i : i + 1]
    assert torch.equal(q.mix_expected(w, probs), manual)
    one_hot = torch.nn.functional.one_hot(torch.full((50,), 3), len(CANDS)).float()
    assert torch.equal(q.mix_expected(w, one_hot), q.quantize(w, 3))


def test_mix_expected_gradients_match_the_per_candidate_autograd_sum():
    """The fused expected-mode function gives the gradients autograd gives the plain sum."""
    grads = []
    for fused in (True, False):
        q, w, _ = make(n=80)
        with torch.no_grad():
            q.beta.copy_(torch.linspace(-0.002, 0.002, q.dim))
            w.mul_(3)  # some values beyond the clamp range of the small bit-widths
        w = w.detach().requires_grad_()
        probs = torch.softmax(torch.randn(80, len(CANDS), generator=torch.Generator().manual_seed(7)), 1)
        probs.requires_grad_()
        if fused:
            out = q.mix_expected(w, probs)
        else:
            out = sum(q.quantize(w, i) * probs[:, i : i + 1] for i, b in enumerate(CANDS) if b > 0)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
        (out * g).sum().backward()
        grads.append([w.grad, probs.grad, q.alpha.grad, q.beta.grad])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()


@pytest.mark.parametrize("estimator", ["score", "st"])
def test_mix_sampled_forward_and_logit_gradients(estimator):
    q, w, _ = make(n=300)
    logits = torch.randn(300, len(CANDS), generator=torch.Generator().manual_seed(5), requires_grad=True)
    out = q.mix_sampled(w, logits, tau=1.0, generator=torch.Generator().manual_seed(7), estimator=estimator)
    k = (logits.detach() + gumbel_like(logits, torch.Generator().manual_seed(7))).argmax(1)
    assert torch.equal(out.detach(), q.quantize_per_row(w, k).detach())
    (out * torch.randn_like(out)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0 and q.alpha.grad.abs().sum() > 0
    again = q.mix_sampled(w, logits.detach(), generator=torch.Generator().manual_seed(7), estimator=estimator)
    assert torch.equal(again, out.detach())
    with pytest.raises(ValueError):
        q.mix_sampled(w, logits, estimator="bogus")


def test_score_estimator_is_unbiased_for_expected_gradient():
    n = 4000
    q, w, _ = make(n=n, dim=8, cands=tuple(range(7)))
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(n, 8, generator=gen) * 0.01 + w
    base = torch.tensor([0.5, 0.0, 0.2, 1.0, 0.0, -0.3, -0.5])
    lg = base.clone().requires_grad_()
    (q.mix_expected(w, torch.softmax(lg, 0).expand(n, 7)) * g).sum().backward()
    expected = lg.grad.clone()
    acc = torch.zeros(7)
    for _ in range(5):
        lg = base.clone().requires_grad_()
        (q.mix_sampled(w, lg.expand(n, 7), generator=gen, estimator="score") * g).sum().backward()
        acc += lg.grad / 5
    assert torch.nn.functional.cosine_similarity(acc, expected, dim=0) > 0.99
    torch.testing.assert_close(acc, expected, rtol=0.1, atol=0.05 * expected.abs().max().item())


def test_shape_errors():
    q, w, idx = make()
    with pytest.raises(ValueError):
        q.quantize_per_row(w[:, :3], idx)
    with pytest.raises(ValueError):
        q.quantize_per_row(w, idx[:3])
    with pytest.raises(ValueError):
        q.mix_expected(w, torch.ones(len(w), 2))
    with pytest.raises(IndexError):
        q.quantize(w, len(CANDS))
