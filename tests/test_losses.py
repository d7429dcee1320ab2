"Property tests for kdlit.losses: kd_loss (every divergence, both paths) and lm_loss."
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kdlit.losses import DIVERGENCES, kd_loss, lm_loss, _divergence_rows, _logprobs

torch.set_num_threads(1)
FAST = settings(max_examples=25, deadline=None, derandomize=True)

divergences = st.sampled_from(DIVERGENCES)
temps = st.sampled_from([0.5, 1.0, 2.0, 4.0])
unit = st.floats(0.0, 1.0)


def logits(seed, shape, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@st.composite
def pairs(draw, max_rows=5, max_v=12):
    "Student/teacher logits with random leading dims, vocab and scale (float64), and the seed used."
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 3), (max_rows,)]))
    v = draw(st.integers(2, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    return logits(seed, (*lead, v), scale), logits(seed + 1, (*lead, v), scale), seed


def kw(divergence, beta=0.3, skew=0.2, **more):
    return dict(divergence=divergence, beta=beta, skew=skew, **more)


# --- values --------------------------------------------------------------------------------------------

@FAST
@given(pairs(), divergences, temps, unit, unit)
def test_nonnegative_and_zero_on_identical(pair, div, T, beta, skew):
    s, t, _ = pair
    for ck in (0, None):
        d = kd_loss(s, t, temperature=T, chunk_size=ck, **kw(div, beta, skew))
        assert d.isfinite() and d >= -1e-9
        same = kd_loss(t, t, temperature=T, chunk_size=ck, **kw(div, beta, skew))
        if div == "soft_ce":   # = T²·H(p), the teacher's entropy
            lt = _logprobs(t.reshape(-1, t.shape[-1]), T)
            torch.testing.assert_close(same, T * T * -(lt.exp() * lt).sum(-1).mean(), rtol=1e-9, atol=1e-9)
        else:
            assert abs(same.item()) < 1e-9


@FAST
@given(pairs(), divergences, temps, st.floats(-50, 50), st.booleans())
def test_invariant_to_a_constant_shift(pair, div, T, c, student_side):
    s, t, _ = pair
    a = kd_loss(s, t, temperature=T, **kw(div))
    b = kd_loss(s + c, t, temperature=T, **kw(div)) if student_side else kd_loss(s, t + c, temperature=T, **kw(div))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_matches_textbook_formulas():
    s, t = logits(0, (4, 9)), logits(1, (4, 9))
    q, p = F.softmax(s / 2, -1), F.softmax(t / 2, -1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1)
    m = 0.3 * p + 0.7 * q
    want = {"forward_kl": kl(p, q), "reverse_kl": kl(q, p), "soft_ce": -(p * q.log()).sum(-1),
            "jsd": 0.3 * kl(p, m) + 0.7 * kl(q, m),
            "skew_forward_kl": kl(p, 0.2 * p + 0.8 * q), "skew_reverse_kl": kl(q, 0.8 * p + 0.2 * q)}
    for div in DIVERGENCES:
        torch.testing.assert_close(kd_loss(s, t, temperature=2.0, **kw(div)), 4 * want[div].mean())


def test_jsd_endpoints_are_exact_kls():
    s, t = logits(0, (3, 7)), logits(1, (3, 7))
    torch.testing.assert_close(kd_loss(s, t, divergence="jsd", beta=0.0), kd_loss(s, t))
    torch.testing.assert_close(kd_loss(s, t, divergence="jsd", beta=1.0), kd_loss(s, t, divergence="reverse_kl"))
    assert kd_loss(s, t, divergence="jsd", beta=1e-4) < 1e-2 * kd_loss(s, t)   # the limit is 0, not KL


# --- chunked path = reference path, gradients = closed form ---------------------------------------------

def value_and_grad(s, t, labels=None, **k):
    z = s.clone().requires_grad_()
    loss = kd_loss(z, t, labels, **k)
    loss.backward()
    return loss.detach(), z.grad


@FAST
@given(pairs(max_rows=7), divergences, temps, st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 3, None]))
def test_chunked_equals_reference(pair, div, T, seed, chunk):
    s, t, _ = pair
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(seed)) < 0.3
    labels = torch.where(mask, -100, 1)
    a, ga = value_and_grad(s, t, labels, temperature=T, chunk_size=0, **kw(div))
    b, gb = value_and_grad(s, t, labels, temperature=T, chunk_size=chunk, **kw(div))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-10)
    assert (gb[labels == -100] == 0).all()                 # masked positions: exactly zero gradient


@FAST
@given(pairs(), temps)
def test_forward_kl_gradient_is_T_times_q_minus_p(pair, T):
    s, t, _ = pair
    for ck in (0, None):
        _, g = value_and_grad(s, t, temperature=T, chunk_size=ck)
        n = max(math.prod(s.shape[:-1]), 1)
        torch.testing.assert_close(g, T * (F.softmax(s / T, -1) - F.softmax(t / T, -1)) / n, rtol=1e-7, atol=1e-12)


@FAST
@given(pairs(), divergences, temps, unit, unit)
def test_chunked_gradient_equals_autograd_of_reference(pair, div, T, beta, skew):
    s, t, _ = pair
    z = s.clone().requires_grad_()
    ref = _divergence_rows(_logprobs(z.reshape(-1, s.shape[-1]), T), _logprobs(t.reshape(-1, t.shape[-1]), T),
                           div, beta, skew)
    want = torch.autograd.grad(T * T * ref.mean(), z)[0] if ref.requires_grad else torch.zeros_like(s)
    _, got = value_and_grad(s, t, temperature=T, **kw(div, beta, skew))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


# --- precision, magnitudes, -inf ----------------------------------------------------------------------

@FAST
@given(pairs(max_v=30), divergences, temps, st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_inputs_match_fp32(pair, div, T, dtype):
    s, t, _ = pair
    sh, th = s.to(dtype), t.to(dtype)
    a, ga = value_and_grad(sh, th, temperature=T, **kw(div))
    b, gb = value_and_grad(sh.float(), th.float(), temperature=T, **kw(div))
    assert a.dtype == torch.float32 and ga.dtype == dtype
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.float(), gb, rtol=0, atol=1e-2 * gb.abs().max().item() + 1e-7)


def test_fp16_gradient_does_not_underflow_under_a_grad_scaler():
    s, t = logits(0, (1, 50), 0.01, torch.float16), logits(1, (1, 50), 0.01, torch.float16)
    zh = s.clone().requires_grad_()
    (kd_loss(zh, t, num_items=4096) * 65536.0).backward()
    z = s.float().requires_grad_()
    (kd_loss(z, t.float(), num_items=4096) * 65536.0).backward()
    torch.testing.assert_close(zh.grad.float(), z.grad, rtol=2e-3, atol=2e-3 * z.grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_huge_finite_logits_stay_finite(dtype, scale):
    scale = min(scale, torch.finfo(dtype).max / 8)
    s, t = logits(0, (3, 16), 1.0).mul(scale).to(dtype), logits(1, (3, 16), 1.0).mul(scale).to(dtype)
    for div in DIVERGENCES:
        if div == "reverse_kl": continue   # KL(q‖p) with one-hot q and p genuinely overflows fp32 at 1e30
        for ck in (0, None):
            loss, g = value_and_grad(s, t, temperature=0.5, chunk_size=ck, **kw(div))
            assert loss.isfinite() and g.isfinite().all(), (div, ck)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("ck", [0, None, 1])
def test_neg_inf_logits_where_the_divergence_is_finite(div, ck):
    s, t = logits(0, (4, 10)), logits(1, (4, 10))
    s[:, :3] = t[:, :3] = -math.inf                       # masked on both sides: finite for every divergence
    if div not in ("reverse_kl",): t[:, 3:5] = -math.inf  # masked teacher entries: finite unless KL(q‖p)
    loss, g = value_and_grad(s, t, temperature=2.0, chunk_size=ck, **kw(div))
    assert loss.isfinite() and g.isfinite().all()
    assert (g[:, :3] == 0).all()
    ref, gref = value_and_grad(s, t, temperature=2.0, chunk_size=0, **kw(div))
    torch.testing.assert_close(loss, ref); torch.testing.assert_close(g, gref)


def test_reverse_kl_is_infinite_where_only_the_teacher_is_masked():
    s, t = logits(0, (2, 10)), logits(1, (2, 10))
    t[:, 0] = -math.inf
    assert kd_loss(s, t, divergence="reverse_kl").isinf()


def test_garbage_in_masked_rows_does_not_leak():
    s, t = logits(0, (2, 3, 10)), logits(1, (2, 3, 10))
    labels = torch.ones(2, 3, dtype=torch.long); labels[1, 2] = -100
    s[1, 2] = math.nan; t[1, 2, 0] = math.inf
    for ck in (0, None):
        loss, g = value_and_grad(s, t, labels, chunk_size=ck)
        assert loss.isfinite() and g.isfinite().all() and (g[1, 2] == 0).all()


def test_teacher_gets_no_gradient():
    s, t = logits(0, (3, 10)).requires_grad_(), logits(1, (3, 10)).requires_grad_()
    for ck in (0, None):
        kd_loss(s, t, chunk_size=ck).backward()
    assert t.grad is None and s.grad is not None


# --- masking, num_items, vocab slicing ----------------------------------------------------------------

@pytest.mark.parametrize("ck", [0, None])
def test_all_masked_gives_zero_with_zero_gradient(ck):
    s, t = logits(0, (2, 4, 10)), logits(1, (2, 4, 10))
    loss, g = value_and_grad(s, t, torch.full((2, 4), -100), chunk_size=ck)
    assert loss.item() == 0 and (g == 0).all()
    loss, g = value_and_grad(s, t, torch.full((2, 4), -100), num_items=0, chunk_size=ck)
    assert loss.item() == 0 and (g == 0).all()


@FAST
@given(pairs(max_rows=6), divergences, st.integers(1, 100))
def test_num_items_is_the_divisor(pair, div, num_items):
    s, t, _ = pair
    n = math.prod(s.shape[:-1])
    a = kd_loss(s, t, temperature=2.0, **kw(div))
    b = kd_loss(s, t, temperature=2.0, num_items=num_items, **kw(div))
    torch.testing.assert_close(b, a * n / num_items)


def test_ignore_index_and_mean_over_valid():
    s, t = logits(0, (2, 3, 10)), logits(1, (2, 3, 10))
    labels = torch.tensor([[5, -1, 2], [-1, -1, 7]])
    per = _divergence_rows(_logprobs(s, 1.0), _logprobs(t, 1.0))
    torch.testing.assert_close(kd_loss(s, t, labels, ignore_index=-1), per[labels != -1].mean())
    torch.testing.assert_close(kd_loss(s, t, labels), per.mean())   # no -100 labels: every position counts


@pytest.mark.parametrize("ck", [0, None, 2])
def test_vocab_size_slices_both_sides(ck):
    s, t = logits(0, (2, 3, 12)), logits(1, (2, 3, 10))
    with pytest.raises(ValueError, match="vocab_size"):
        kd_loss(s, t)
    loss, g = value_and_grad(s, t, vocab_size=10, chunk_size=ck)
    ref, gref = value_and_grad(s[..., :10], t, chunk_size=ck)
    torch.testing.assert_close(loss, ref); torch.testing.assert_close(g[..., :10], gref)
    assert (g[..., 10:] == 0).all()
    torch.testing.assert_close(kd_loss(s[..., :8], t, vocab_size=8), kd_loss(s[..., :8], t[..., :8]))


def test_incoming_gradient_scales_and_retain_graph():
    s, t = logits(0, (3, 10)), logits(1, (3, 10))
    _, g1 = value_and_grad(s, t)
    z = s.clone().requires_grad_(); (3.0 * kd_loss(z, t)).backward()
    torch.testing.assert_close(z.grad, 3 * g1)
    z = s.clone().requires_grad_(); loss = kd_loss(z, t, chunk_size=0)
    loss.backward(retain_graph=True); loss.backward()
    torch.testing.assert_close(z.grad, 2 * g1)
    z = s.clone().requires_grad_(); loss = kd_loss(z, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="chunk_size=0"):
        loss.backward()


def test_no_grad_and_leading_dims():
    s, t = logits(0, (2, 3, 4, 10)), logits(1, (2, 3, 4, 10))
    with torch.no_grad():
        a = kd_loss(s, t)
    torch.testing.assert_close(a, kd_loss(s.reshape(-1, 10), t.reshape(-1, 10)))
    torch.testing.assert_close(kd_loss(s[0, 0, 0], t[0, 0, 0]), kd_loss(s[:1, 0, 0], t[:1, 0, 0]))   # 1-D [V]


# --- bad input ----------------------------------------------------------------------------------------

S, T_, L = logits(0, (2, 3, 10)), logits(1, (2, 3, 10)), torch.zeros(2, 3, dtype=torch.long)
BAD = [
    (dict(temperature=0), "temperature.*0"), (dict(temperature=-2.0), "temperature.*-2.0"),
    (dict(temperature=math.nan), "temperature.*nan"), (dict(temperature=math.inf), "temperature.*inf"),
    (dict(temperature="2"), "temperature.*'2'"), (dict(divergence="kl"), "divergence.*'kl'"),
    (dict(beta=1.5), "beta.*1.5"), (dict(beta=-0.1), "beta.*-0.1"), (dict(skew=2.0), "skew.*2.0"),
    (dict(chunk_size=-1), "chunk_size.*-1"), (dict(chunk_size=1.5), "chunk_size.*1.5"),
    (dict(num_items=-1), "num_items.*-1"), (dict(num_items=math.nan), "num_items.*nan"),
    (dict(vocab_size=11), "vocab_size.*11"), (dict(vocab_size=0), "vocab_size.*0"),
    (dict(ignore_index=1.0), "ignore_index.*1.0"),
    (dict(labels=L.float()), "labels.*float"), (dict(labels=L[:, :2]), r"labels.*\(2, 2\)"),
    (dict(labels=L.bool()), "labels.*bool"),
]


@pytest.mark.parametrize("bad,msg", BAD)
def test_bad_input_raises_value_error_naming_argument(bad, msg):
    bad = dict(bad)
    labels = bad.pop("labels", None)
    with pytest.raises(ValueError, match=msg):
        kd_loss(S, T_, labels, **bad)


def test_bad_tensors():
    with pytest.raises(ValueError, match=r"teacher_logits.*\(2, 2\)"):
        kd_loss(S, T_[:, :2])
    with pytest.raises(ValueError, match="student_logits.*int64"):
        kd_loss(S.long(), T_)
    with pytest.raises(ValueError, match="teacher_logits.*list"):
        kd_loss(S, [1.0])
    with pytest.raises(ValueError, match="num_items"):
        kd_loss(S, T_, num_items=0)    # valid positions exist


# --- lm_loss ------------------------------------------------------------------------------------------

@FAST
@given(pairs(max_v=20), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_lm_loss_matches_cross_entropy_over_valid(pair, seed, dtype):
    s, _, _ = pair
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, s.shape[-1], s.shape[:-1], generator=g)
    labels[torch.rand(s.shape[:-1], generator=g) < 0.3] = -100
    x = s.to(dtype)
    valid = labels != -100
    want = F.cross_entropy(x.float()[valid], labels[valid], reduction="sum") / max(int(valid.sum()), 1)
    got = lm_loss(x, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_lm_loss_masking_num_items_and_errors():
    s = logits(0, (2, 3, 10), dtype=torch.float32)
    labels = torch.tensor([[1, 2, -100], [-100, 4, 5]])
    s[0, 2] = math.nan                                     # garbage in a masked row
    z = s.clone().requires_grad_(); loss = lm_loss(z, labels); loss.backward()
    assert loss.isfinite() and z.grad.isfinite().all() and (z.grad[0, 2] == 0).all()
    torch.testing.assert_close(lm_loss(s, labels, num_items=8), loss * 4 / 8)
    z = s.clone().requires_grad_(); loss = lm_loss(z, torch.full((2, 3), -100)); loss.backward()
    assert loss.item() == 0 and (z.grad == 0).all()
    for bad, msg in [(labels.float(), "labels"), (labels + 10, "labels.*10"), (labels[:1], "labels")]:
        with pytest.raises(ValueError, match=msg):
            lm_loss(s, bad)
    with pytest.raises(ValueError, match="num_items"):
        lm_loss(s, labels, num_items=-1)


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_cpu_thread_pool_path_matches_and_restores_threads(div):
    s, t = logits(0, (9, 12)), logits(1, (9, 12))
    labels = torch.ones(9, dtype=torch.long); labels[[1, 4]] = -100
    ref, gref = value_and_grad(s, t, labels, temperature=2.0, chunk_size=0, divergence=div)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for ck in (1, 2, 4):
            loss, g = value_and_grad(s, t, labels, temperature=2.0, chunk_size=ck, divergence=div)
            torch.testing.assert_close(loss, ref); torch.testing.assert_close(g, gref)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_gradient_buffer_is_reused_only_once_free():
    "A pooled gradient buffer comes back only when no tensor uses it: a kept gradient is never overwritten."
    from kdlit import losses
    s, t = logits(0, (1024, 8192), 3.0, torch.float32), logits(1, (1024, 8192), 3.0, torch.float32)   # 32 MiB: pooled
    losses.release_buffers()
    a = s.clone().requires_grad_(); kd_loss(a, t, temperature=2.0).backward()
    kept, p1 = a.grad, a.grad.data_ptr()
    expected = kept.clone()
    b = s.clone().requires_grad_(); kd_loss(b, t, temperature=3.0).backward()
    assert b.grad.data_ptr() != p1                       # the first gradient is alive: a new buffer
    assert torch.equal(kept, expected)                   # and it was not touched
    del a, kept
    c = s.clone().requires_grad_(); kd_loss(c, t, temperature=2.0).backward()
    assert c.grad.data_ptr() == p1                       # freed: handed out again
    assert torch.equal(c.grad, expected)                 # with the right values written over the old ones
    del b, c
    assert losses.pooled_bytes() >= 2 * 1024 * 8192 * 4
    losses.release_buffers()
    assert losses.pooled_bytes() == 0
    losses.REUSE_BUFFERS = False
    try:
        d = s.clone().requires_grad_(); kd_loss(d, t).backward(); del d
        assert losses.pooled_bytes() == 0 and not losses._POOL
    finally: losses.REUSE_BUFFERS = True


def test_reused_buffer_has_masked_rows_and_extra_columns_zeroed():
    "A pooled buffer holds the last call's gradient: rows left out by the labels and columns past vocab_size are zeroed."
    from kdlit import losses
    s, t = logits(0, (1024, 8192), 3.0, torch.float32), logits(1, (1024, 8192), 3.0, torch.float32)
    losses.release_buffers()
    a = s.clone().requires_grad_(); kd_loss(a, t, temperature=2.0).backward()
    p1 = a.grad.data_ptr(); del a                          # a full, non-zero gradient left in the pooled buffer
    labels = torch.randint(0, 8192, (1024,)); labels[100:300] = -100; labels[torch.randperm(1024)[:50]] = -100
    b = s.clone().requires_grad_(); kd_loss(b, t, labels, temperature=2.0, vocab_size=8000).backward()
    assert b.grad.data_ptr() == p1                         # the same memory, handed out again
    left_out = labels == -100
    assert torch.count_nonzero(b.grad[left_out]) == 0 and torch.count_nonzero(b.grad[:, 8000:]) == 0
    ref = s.clone().requires_grad_(); kd_loss(ref, t, labels, temperature=2.0, vocab_size=8000, chunk_size=0).backward()
    torch.testing.assert_close(b.grad, ref.grad, rtol=1e-5, atol=1e-9)
    del b; losses.release_buffers()


def test_inplace_writes_the_gradient_during_the_call():
    s, t = logits(0, (2, 7, 50), 3.0), logits(1, (2, 7, 50), 3.0)
    w0 = s.clone().requires_grad_(); w = w0 * 1
    loss = kd_loss(w, t, temperature=2.0, inplace_backward=True)
    ref = s.clone().requires_grad_(); kd_loss(ref, t, temperature=2.0, chunk_size=0).backward()
    torch.testing.assert_close(w.detach(), ref.grad)     # already the gradient, before backward
    (2 * loss).backward()
    torch.testing.assert_close(w0.grad, 2 * ref.grad)


# --- sparse targets --------------------------------------------------------------------------------------

from kdlit.losses import SPARSE_DIVERGENCES, sparse_kd_loss, sparse_targets


@FAST
@given(pairs(), st.sampled_from(["topk", "tail", "tail_grid"]), st.sampled_from(SPARSE_DIVERGENCES), temps)
def test_sparse_with_k_equal_v_is_dense(pair, method, div, T):
    s, t, _ = pair
    tg = sparse_targets(t, method, t.shape[-1], dtype=torch.float64)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    ls, ld = sparse_kd_loss(a, tg, temperature=T, divergence=div), kd_loss(b, t, temperature=T, divergence=div, chunk_size=0)
    ls.backward(); ld.backward()
    assert torch.allclose(ls, ld, atol=1e-9, rtol=1e-9) and torch.allclose(a.grad, b.grad, atol=1e-12)


@FAST
@given(pairs(max_v=30), st.integers(1, 29), st.sampled_from([1.0, 1.5, 2.0, 3.0]))
def test_tail_grid_is_a_lower_bound_at_its_temperatures(pair, k, T):
    s, t, _ = pair
    k = min(k, t.shape[-1])
    tg = sparse_targets(t, "tail_grid", k, dtype=torch.float64)
    assert sparse_kd_loss(s, tg, temperature=T) <= kd_loss(s, t, temperature=T, chunk_size=0) + 1e-9


@pytest.mark.parametrize("div", ["reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_sparse_refuses_divergences_without_a_sparse_form(div):
    t = logits(0, (2, 9))
    with pytest.raises(ValueError, match="no sound sparse form"):
        sparse_kd_loss(logits(1, (2, 9)), sparse_targets(t, "tail_grid", 3), divergence=div)


def test_sparse_gives_the_targets_no_gradient():
    t = logits(0, (4, 9)).requires_grad_()
    tg = sparse_targets(t, "tail_grid", 3, dtype=torch.float64)
    assert not tg.logp.requires_grad and not tg.lse.requires_grad
    s = logits(1, (4, 9)).requires_grad_()
    sparse_kd_loss(s, tg, temperature=2.0).backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
