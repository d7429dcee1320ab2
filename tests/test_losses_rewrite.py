"The losses module's structure: what chunk_size means, no process-wide side effects, the gradient pool's liveness rule, one kernel tier."
import math, threading
import pytest, torch
from kdlit import losses
from kdlit.losses import DIVERGENCES, kd_loss, fused_kd_loss, _divergence_rows, _logprobs


def _logits(seed, shape, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _spy_blocks(monkeypatch):
    "Record the number of rows of every block any kernel processes."
    seen = []
    for div, k in list(losses._KERNELS.items()):
        def value(B, c, st, sp, _v=k.value): seen.append(B[0].shape[0]); return _v(B, c, st, sp)
        monkeypatch.setitem(losses._KERNELS, div, k._replace(value=value))
    return seen


@pytest.mark.parametrize("ck", [1, 3, 5, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_chunk_size_bounds_the_rows_processed_at_once(monkeypatch, ck, masked):
    seen = _spy_blocks(monkeypatch)
    s, t = _logits(0, (4, 9, 50)), _logits(1, (4, 9, 50))
    labels = torch.randint(0, 50, (4, 9)); labels[1, 2:7] = -100
    z = s.clone().requires_grad_()
    kd_loss(z, t, labels if masked else None, temperature=2.0, chunk_size=ck).backward()
    n = int((labels != -100).sum()) if masked else 36
    assert seen and max(seen) <= ck and sum(seen) == n      # every valid row once, never more than ck at a time
    if ck < n: assert max(seen) == ck                        # and blocks are as large as allowed


def test_chunk_size_none_is_cache_sized_on_cpu(monkeypatch):
    seen = _spy_blocks(monkeypatch)
    V = 49152
    s, t = _logits(0, (20, V)), _logits(1, (20, V))
    kd_loss(s.requires_grad_(), t).backward()
    assert max(seen) == losses._BLOCK // V == 8 and sum(seen) == 20


def test_no_thread_count_is_changed_while_a_loss_runs(monkeypatch):
    "No library call flips torch's thread count: set_num_threads is never called, and another thread sees its own count."
    calls, before = [], torch.get_num_threads()
    torch.set_num_threads(2)                                 # the pool path
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    old = torch.get_num_threads()
    seen, stop = [], threading.Event()
    def watch():
        while not stop.is_set(): seen.append(torch.get_num_threads())
    w = threading.Thread(target=watch); w.start()
    try:
        s, t = _logits(0, (64, 3000)), _logits(1, (64, 3000))
        for div in DIVERGENCES:
            kd_loss(s.clone().requires_grad_(), t, divergence=div, chunk_size=4).backward()
        h, W = torch.randn(64, 16), torch.randn(3000, 16)
        fused_kd_loss(h.requires_grad_(), W.requires_grad_(), t, torch.randint(0, 3000, (64,)), chunk_size=16).loss.backward()
    finally:
        stop.set(); w.join(); monkeypatch.undo(); torch.set_num_threads(before)
    assert calls == [] and old == 2
    assert seen and set(seen) == {seen[0]}


def test_pool_threads_run_one_openmp_thread_each_and_the_caller_keeps_its_own():
    if losses._OMP is None: pytest.skip("no per-thread OpenMP control here")
    main = torch.get_num_threads()
    pool = losses._pool(2)
    assert list(pool.map(lambda _: torch.get_num_threads(), range(2))) == [1, 1]
    assert torch.get_num_threads() == main
    other = []
    th = threading.Thread(target=lambda: other.append(torch.get_num_threads())); th.start(); th.join()
    assert other == [main]


@pytest.mark.parametrize("div", DIVERGENCES)
def test_two_threads_match_one(div):
    s, t = _logits(0, (40, 700)), _logits(1, (40, 700))
    labels = torch.randint(0, 700, (40,)); labels[5:9] = -100
    out = {}
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            z = s.clone().requires_grad_(); loss = kd_loss(z, t, labels, temperature=1.5, divergence=div, chunk_size=3)
            loss.backward(); out[n] = (loss, z.grad)
    finally: torch.set_num_threads(old)
    torch.testing.assert_close(out[1][0], out[2][0], rtol=0, atol=0)
    torch.testing.assert_close(out[1][1], out[2][1], rtol=0, atol=0)


def test_pooled_buffer_waits_for_every_view_and_is_not_refcount_based():
    "A gradient's memory comes back to the pool only when no tensor, view included, uses it."
    losses.release_buffers()
    s, t = _logits(0, (1024, 8192)), _logits(1, (1024, 8192))
    a = s.clone().requires_grad_(); kd_loss(a, t, temperature=2.0).backward()
    p1, view = a.grad.data_ptr(), a.grad[10:20]
    expected = view.clone()
    del a
    assert losses.pooled_bytes() == 0                        # the view keeps the memory in use
    b = s.clone().requires_grad_(); kd_loss(b, t, temperature=3.0).backward()
    assert b.grad.data_ptr() != p1 and torch.equal(view, expected)
    del view
    assert losses.pooled_bytes() >= 1024 * 8192 * 4          # now idle
    c = s.clone().requires_grad_(); kd_loss(c, t, temperature=2.0).backward()
    assert c.grad.data_ptr() == p1
    del b, c; losses.release_buffers()
    assert not hasattr(losses, "_idle")                      # no reference-count test is left


@pytest.mark.parametrize("div", DIVERGENCES)
def test_float64_goes_through_the_kernels_in_float64(div, monkeypatch):
    seen = _spy_blocks(monkeypatch)
    s, t = _logits(0, (6, 40), dtype=torch.float64), _logits(1, (6, 40), dtype=torch.float64)
    z = s.clone().requires_grad_(); loss = kd_loss(z, t, temperature=0.7, divergence=div, beta=0.3, skew=0.2, chunk_size=4)
    loss.backward()
    assert seen and loss.dtype == torch.float64
    r = s.clone().requires_grad_()
    ref = _divergence_rows(_logprobs(r, 0.7), _logprobs(t, 0.7), div, 0.3, 0.2).sum() * 0.49 / 6
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z.grad, r.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("div", ["forward_kl", "jsd", "skew_reverse_kl", "soft_ce"])
def test_fused_with_neg_inf_teacher_rows_keeps_the_ce_gradient(div):
    "Rows the block formulas cannot value are redone by the reference before the CE gradient is added."
    torch.manual_seed(0)
    h, W, t = torch.randn(12, 8), torch.randn(30, 8), torch.randn(12, 30) * 2
    t[[1, 7], :5] = -math.inf
    y = torch.randint(0, 30, (12,))
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = fused_kd_loss(h1, W1, t, y, temperature=2.0, divergence=div, chunk_size=5)
    out.loss.backward()
    h2, W2 = h.double().requires_grad_(), W.double().requires_grad_()
    z = h2 @ W2.T
    ref = kd_loss(z, t.double(), y, temperature=2.0, divergence=div, chunk_size=0) + losses.lm_loss(z, y)
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(W1.grad.double(), W2.grad, rtol=1e-4, atol=1e-5)


def test_one_kernel_tier_and_a_fixed_table():
    "One kernel per divergence, defined once: the table is not rewritten after import, and no second tier remains."
    assert set(losses._KERNELS) == set(DIVERGENCES)
    for name in ("_fast_kernel", "_fast_rows", "_lean_kl", "_LEAN", "_ORIGINAL", "_EXACT", "_kd_sum", "_Workspace", "_ChunkedKD"):
        assert not hasattr(losses, name), name


def test_a_forked_child_gets_its_own_pool():
    "The parent's pool threads do not exist in a forked child: a loss there must not wait on them."
    import multiprocessing as mp
    if losses._OMP is None or "fork" not in mp.get_all_start_methods(): pytest.skip("needs fork and the pool")
    old = torch.get_num_threads(); torch.set_num_threads(2)
    try:
        s, t = _logits(0, (32, 500)), _logits(1, (32, 500))
        kd_loss(s, t, chunk_size=2)                          # the parent's pool exists now
        both = threading.Barrier(2)
        list(losses._pool(2).map(lambda _: both.wait(timeout=10), range(2)))   # with both its threads started, idle
        ctx = mp.get_context("fork")
        with ctx.Pool(1) as p:
            r = p.apply_async(_child_loss, (s, t))
            assert abs(r.get(timeout=30) - float(kd_loss(s, t, chunk_size=2))) < 1e-6
    finally: torch.set_num_threads(old)


def _child_loss(s, t):
    torch.set_num_threads(2)
    return float(kd_loss(s, t, chunk_size=2))


@pytest.mark.parametrize("div", DIVERGENCES)
def test_finite_logits_never_take_the_reference_fallback(div, monkeypatch):
    "Only rows the block formulas cannot value go to the reference: none when every logit is finite."
    calls = []
    real = losses._redo
    monkeypatch.setattr(losses, "_redo", lambda *a: calls.append(1) or real(*a))
    s, t = _logits(0, (30, 300)), _logits(1, (30, 300))
    for _ in range(5):
        kd_loss(s.clone().requires_grad_(), t, temperature=2.0, divergence=div, chunk_size=4).backward()
    assert calls == []
    s, t = s.clone(), t.clone(); s[3, :7] = t[3, :7] = -math.inf   # and a row that needs it does take it (0·∞)
    kd_loss(s.requires_grad_(), t, temperature=2.0, divergence=div, chunk_size=4).backward()
    assert calls


@pytest.mark.parametrize("method", ["tail_grid", "topk"])
def test_fused_sparse_rows_whose_softmax_underflows_equal_the_unfused_loss(method, monkeypatch):
    """fp32 rows where a kept token's q (T = 1) and a label's softmax underflow to 0 from finite logits: the fused sparse loss
    sends them to the log-space reference, so value and gradients equal the unfused computation in float64."""
    from kdlit.losses import fused_sparse_kd_loss, sparse_kd_loss, sparse_targets, lm_loss
    torch.manual_seed(0)
    h, W, t = torch.randn(2, 7, 8), torch.randn(30, 8) * 0.5, torch.randn(2, 7, 30) * 2
    tg = sparse_targets(t, method, 5, dtype=torch.float32)
    y = torch.randint(0, 30, (2, 7))
    h[0, 3] = 0.; h[0, 3, 0] = 1.; W[:, 0] = 0.; W[0, 0] = 200.              # row (0, 3): token 0 at 200, all else at 0
    k_id = int(tg.ids[0, 3, 0]) if int(tg.ids[0, 3, 0]) != 0 else int(tg.ids[0, 3, 1])
    y[0, 3] = k_id                                                          # its label: a token at e^-200 (0 in fp32)
    redone, real = [], losses._sparse_redo
    monkeypatch.setattr(losses, "_sparse_redo", lambda S, tg_, y_, a, bad: redone.append(bad.tolist()) or real(S, tg_, y_, a, bad))
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = fused_sparse_kd_loss(h1, W1, tg, y, temperature=1.0, kd_weight=0.6, lm_weight=0.4, chunk_size=4)
    assert redone and redone[0] == [3]     # that row went to the reference (others, with token 0 far above the rest, may too)
    out.loss.backward()
    h2, W2 = h.double().requires_grad_(), W.double().requires_grad_()
    z = h2 @ W2.T
    ref = 0.6 * sparse_kd_loss(z, tg, y, temperature=1.0) + 0.4 * lm_loss(z, y)
    ref.backward()
    assert torch.isfinite(out.loss) and out.lm > 10                        # the e^-200 label is valued, not lost
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(W1.grad.double(), W2.grad, rtol=1e-4, atol=1e-5)


def _four_entry_points():
    "kd_loss, sparse_kd_loss, fused_kd_loss and fused_sparse_kd_loss on the same 2×3 positions, V = 10, as f(labels, **kw)."
    from kdlit.losses import sparse_kd_loss, fused_sparse_kd_loss, sparse_targets
    h, W, t = _logits(0, (2, 3, 4)), _logits(1, (10, 4)), _logits(2, (2, 3, 10))
    s, tg = h @ W.T, sparse_targets(t, "tail_grid", k=3, dtype=torch.float32)
    return {"kd_loss": lambda y, **kw: kd_loss(s, t, y, **kw),
            "sparse_kd_loss": lambda y, **kw: sparse_kd_loss(s, tg, y, **kw),
            "fused_kd_loss": lambda y, **kw: fused_kd_loss(h, W, t, y, **kw),
            "fused_sparse_kd_loss": lambda y, **kw: fused_sparse_kd_loss(h, W, tg, y, **kw)}


SHARED_BAD = [(dict(temperature=0.0), r"temperature must be a finite number in \(0, inf\], got 0.0"),
              (dict(divergence="kl"), r"divergence.*'kl'"),
              (dict(ignore_index=1.5), r"ignore_index must be an int, got 1.5"),
              (dict(ignore_index=True), r"ignore_index must be an int, got True"),
              (dict(vocab_size=11), r"vocab_size must be an int in \[1, 10\], got 11"),
              (dict(vocab_size="8"), r"vocab_size must be an int in \[1, 10\], got '8'"),
              (dict(num_items=-2), r"num_items must be a finite number in \[0, inf\], got -2"),
              (dict(y=torch.tensor([[0, 1, 10], [2, -100, 3]])), r"labels must be in \[0, 10\) .* got values in \[0, 10\]"),
              (dict(y=torch.zeros(2, 2, dtype=torch.long)), r"labels must have the logits' leading shape \(2, 3\), got \(2, 2\)")]


@pytest.mark.parametrize("name", ["kd_loss", "sparse_kd_loss", "fused_kd_loss", "fused_sparse_kd_loss"])
@pytest.mark.parametrize("bad,msg", SHARED_BAD)
def test_the_four_losses_reject_a_shared_argument_with_the_same_line(name, bad, msg):
    "Each bad shared argument: one ValueError line, the same from every loss (the sparse pair name their own divergences)."
    bad = dict(bad); y = bad.pop("y", torch.zeros(2, 3, dtype=torch.long))
    if name in ("kd_loss", "sparse_kd_loss") and "labels must be in" in msg:   # the unfused losses never index by label
        assert _four_entry_points()[name](y, **bad).isfinite(); return
    if "sparse" in name and bad.get("divergence") == "kl": msg = "divergence 'kl' has no sound sparse form: it needs the teacher's"
    with pytest.raises(ValueError, match=msg):
        _four_entry_points()[name](y, **bad)


@pytest.mark.parametrize("name,lo", [("kd_loss", 0), ("fused_kd_loss", 1), ("fused_sparse_kd_loss", 1)])
def test_chunk_size_is_checked_alike(name, lo):
    f = _four_entry_points()[name]; y = torch.zeros(2, 3, dtype=torch.long)
    for bad in (lo - 1, 2.0, True):
        with pytest.raises(ValueError, match=rf"chunk_size must be None or an int >= {lo}, got {bad!r}"): f(y, chunk_size=bad)
    out = f(y, chunk_size=lo)                                  # kd_loss's 0: the autograd reference
    assert (out if name == "kd_loss" else out.loss).isfinite()


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("mask", ["runs", "scattered"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_rows_under_masking_equal_the_reference(div, mask, inplace, dtype):
    """Rows with −inf logits among masked positions — walked as runs, or gathered when the mask is scattered — get the
    reference's value and gradient whether the gradient has its own buffer (checked once, after the sweep) or overwrites the
    logits (checked block by block), on one thread and split between two."""
    s, t = _logits(0, (3, 11, 40), dtype=dtype), _logits(1, (3, 11, 40), dtype=dtype)
    s[0, 4, :6] = t[0, 4, :6] = -math.inf; s[2, 9, 10:13] = t[2, 9, 10:13] = -math.inf
    if div != "reverse_kl": t[1, 1, 30:] = -math.inf    # masked in the teacher only: finite except for KL(q‖p)
    labels = torch.randint(0, 40, (3, 11))
    if mask == "runs": labels[0, :2] = labels[1, 5:9] = -100
    else: labels.view(-1)[1::2] = -100; labels[0, 4] = labels[2, 9] = labels[1, 1] = 1
    kw = dict(temperature=2.0, divergence=div)
    z = s.clone().requires_grad_(); ref = kd_loss(z, t, labels, chunk_size=0, **kw); ref.backward()
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x = s.clone().requires_grad_(); loss = kd_loss(x, t, labels, chunk_size=2, inplace_backward=inplace, **kw)
            loss.backward()
            assert loss.isfinite() and x.grad.isfinite().all(), (threads,)
            torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(x.grad.float(), z.grad.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    finally: torch.set_num_threads(old)
