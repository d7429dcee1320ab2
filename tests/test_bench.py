"""Fast paths of kdlit.losses against float64 references, and the benchmark harness on tiny sizes.

Numbers only: benchmarks never fail on time, so nothing here asserts a duration."""
import json, math
import pytest
import torch
import torch.nn.functional as F
from kdlit.losses import DIVERGENCES, kd_loss, lm_loss, fused_kd_loss, FusedKDOutput
from kdlit import bench

torch.set_num_threads(1)


def ref_rows(s, t, divergence, T, beta=0.5, skew=0.1):
    "Independent float64 reference: per-row D(p_T‖q_T) from log-softmax, no shared code with kdlit."
    lq, lp = torch.log_softmax(s.double() / T, -1), torch.log_softmax(t.double() / T, -1)
    q, p = lq.exp(), lp.exp()
    kl = lambda a, la, lb: (a * (la - lb)).sum(-1)
    def lmix(w, la, lb):  # log(w·a + (1-w)·b)
        return torch.log(w * la.exp() + (1 - w) * lb.exp())
    if divergence == "forward_kl": return kl(p, lp, lq)
    if divergence == "reverse_kl": return kl(q, lq, lp)
    if divergence == "soft_ce": return -(p * lq).sum(-1)
    if divergence == "jsd":
        if beta == 0: return kl(p, lp, lq)
        if beta == 1: return kl(q, lq, lp)
        lm = lmix(beta, lp, lq)
        return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)
    if divergence == "skew_forward_kl": return kl(p, lp, lmix(skew, lp, lq))
    if divergence == "skew_reverse_kl": return kl(q, lq, lmix(skew, lq, lp))
    raise ValueError(divergence)


def ref_kd(s, t, labels, T, divergence, num_items=None, **kw):
    "(loss, grad wrt s) in float64: T²·Σ_valid D / n."
    s64 = s.detach().double().requires_grad_()
    V = s.shape[-1]
    rows = ref_rows(s64.reshape(-1, V), t.reshape(-1, V), divergence, T, **kw)
    valid = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
    n = num_items if num_items is not None else max(int(valid.sum()), 1)
    loss = T * T * torch.where(valid, rows, 0.).sum() / n
    loss.backward()
    return loss.detach(), s64.grad


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 11, 257, generator=g) * 2
    s = torch.randn(3, 11, 257, generator=g) * 1.5 + 0.6 * t
    labels = torch.randint(0, 257, (3, 11), generator=g)
    labels[0, :4] = -100; labels[2, 7] = -100
    return s, t, labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_fast_path_matches_float64(logits, divergence, T, inplace):
    s, t, labels = logits
    ref_loss, ref_grad = ref_kd(s, t, labels, T, divergence)
    x = s.clone().requires_grad_()
    loss = kd_loss(x * 1, t, labels, temperature=T, divergence=divergence, inplace_backward=inplace)
    loss.backward()
    assert abs(loss.item() - float(ref_loss)) / float(ref_loss) <= 1e-6
    assert rel(x.grad, ref_grad) <= 1e-5
    assert x.grad[0, :4].abs().sum() == 0 and x.grad[2, 7].abs().sum() == 0   # masked rows: exact zeros


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_t_squared_and_num_items(logits, divergence):
    s, t, labels = logits
    for T in (0.5, 3.0):
        ref_loss, ref_grad = ref_kd(s, t, labels, T, divergence, num_items=100)
        x = s.clone().requires_grad_()
        loss = kd_loss(x, t, labels, temperature=T, divergence=divergence, num_items=100)
        loss.backward()
        assert math.isclose(loss.item(), float(ref_loss), rel_tol=1e-6)
        assert rel(x.grad, ref_grad) <= 5e-5   # T = 0.5 sharpens the mixtures (see nbs/00: fp32 rounding of z/T)
    # T² scaling: the loss is T² times the raw divergence mean
    raw = ref_rows(s.reshape(-1, 257), t.reshape(-1, 257), divergence, 3.0)[labels.reshape(-1) != -100].mean()
    assert math.isclose(float(kd_loss(s, t, labels, temperature=3.0, divergence=divergence)), 9 * float(raw), rel_tol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_all_masked_is_zero_with_finite_grad(logits, inplace):
    s, t, _ = logits
    x = s.clone().requires_grad_()
    loss = kd_loss(x * 1, t, torch.full((3, 11), -100), temperature=2.0, inplace_backward=inplace)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(x.grad).all() and x.grad.abs().sum() == 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inplace_equals_normal(logits, divergence):
    s, t, labels = logits
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    la = kd_loss(a * 1, t, labels, temperature=2.0, divergence=divergence)
    w = b * 1
    lb = kd_loss(w, t, labels, temperature=2.0, divergence=divergence, inplace_backward=True)
    (0.3 * la).backward(); (0.3 * lb).backward()
    assert torch.equal(la, lb)
    assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-6 * float(a.grad.abs().max()))
    assert torch.equal(w, b.grad)          # the head output's storage now holds the gradient


def test_inplace_with_inf_and_vocab_slice(logits):
    s, t, labels = logits
    s, t = s.clone(), t.clone()
    s[1, 2, :5] = t[1, 2, :5] = -math.inf; t[0, 6, 9] = -math.inf
    tt = t[..., :250]
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    la = kd_loss(a * 1, tt, labels, vocab_size=250, temperature=2.0)
    lb = kd_loss(b * 1, tt, labels, vocab_size=250, temperature=2.0, inplace_backward=True)
    la.backward(); lb.backward()
    assert torch.isfinite(la) and torch.allclose(la, lb)
    assert torch.isfinite(b.grad).all() and torch.allclose(a.grad, b.grad, atol=1e-8)
    assert b.grad[..., 250:].abs().sum() == 0


def unfused(h, W, teacher, labels, T, divergence, kd_w, lm_w, num_items=None):
    "Reference for fused_kd_loss, in float64: logits, then the float64 KD reference and cross-entropy."
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    z = h64 @ W64.T
    t = teacher.double() if torch.is_tensor(teacher) else teacher[0].double() @ teacher[1].double().T
    V = z.shape[-1]
    valid = labels.reshape(-1) != -100
    n = num_items if num_items is not None else max(int(valid.sum()), 1)
    kd = T * T * torch.where(valid, ref_rows(z.reshape(-1, V), t.reshape(-1, V), divergence, T), 0.).sum() / n
    ce = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), ignore_index=-100, reduction="sum") / n
    loss = kd_w * kd + lm_w * ce
    loss.backward()
    return loss.detach(), kd.detach(), ce.detach(), h64.grad, W64.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_fused_equals_unfused(divergence, teacher_form):
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(2, 13, 24, generator=g), torch.randn(300, 24, generator=g) * 0.4
    th, tW = torch.randn(2, 13, 20, generator=g), torch.randn(300, 20, generator=g) * 0.5
    labels = torch.randint(0, 300, (2, 13), generator=g); labels[1, :5] = -100
    teacher = th @ tW.T if teacher_form == "logits" else (th, tW)
    for kw in (dict(), dict(num_items=40)):
        L, kd, ce, gh, gW = unfused(h, W, teacher, labels, 2.0, divergence, 0.6, 0.4, **kw)
        h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
        out = fused_kd_loss(h1, W1, teacher, labels, temperature=2.0, divergence=divergence,
                            kd_weight=0.6, lm_weight=0.4, chunk_size=7, **kw)
        assert isinstance(out, FusedKDOutput)
        out.loss.backward()
        for a, b in ((out.loss, L), (out.kd, kd), (out.lm, ce)):
            assert abs(float(a) - float(b)) / float(b) <= 1e-6
        assert rel(h1.grad, gh) <= 1e-5 and rel(W1.grad, gW) <= 1e-5
        assert h1.grad[1, :5].abs().sum() == 0


def test_fused_matches_kdlit_losses_and_all_masked():
    g = torch.Generator().manual_seed(2)
    h, W, t = torch.randn(40, 16, generator=g), torch.randn(90, 16, generator=g), torch.randn(40, 90, generator=g)
    y = torch.randint(0, 90, (40,), generator=g)
    out = fused_kd_loss(h, W, t, y, temperature=1.5, kd_weight=1.0, lm_weight=1.0)
    assert torch.allclose(out.kd, kd_loss(h @ W.T, t, y, temperature=1.5), rtol=1e-6)
    assert torch.allclose(out.lm, lm_loss(h @ W.T, y), rtol=1e-6)
    h1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    out = fused_kd_loss(h1, W1, t, torch.full((40,), -100), temperature=2.0)
    out.loss.backward()
    assert float(out.loss) == 0 and h1.grad.abs().sum() == 0 and W1.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="lm_head_weight"): fused_kd_loss(h, W[:, :3], t, y)
    with pytest.raises(ValueError, match="vocab"): fused_kd_loss(h, W, t[:, :80], y)


# ---------------------------------------------------------------- the harness, on tiny sizes
def test_reference_and_measure_in_process():
    r = bench.measure("kdlit", 64, 300, repeats=1, threads=1)
    assert r["status"] == "ok" and r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-5
    r = bench.measure("fused_th", 64, 300, repeats=1, threads=1)
    assert r["status"] == "ok" and r["grad_diff"] <= 1e-5


def test_numerical_failure_is_reported(monkeypatch):
    monkeypatch.setitem(bench.TOLERANCE, "kdlit", (0.0, 0.0))
    r = bench.measure("kdlit", 64, 300, repeats=1, threads=1)
    assert r["status"].startswith("numerics")


def test_too_big_is_skipped_not_allocated():
    r = bench.measure("naive", 10**6, 10**6, repeats=1, threads=1)
    assert r["status"].startswith("skipped")


def test_run_benchmarks_writes_csv_and_json(tmp_path, capsys):
    rows = bench.run_benchmarks([(48, 200)], ["naive", "kdlit"], out_dir=tmp_path, repeats=1, threads=1)
    assert {r["status"] for r in rows} == {"ok"}
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == 2 and "thp" in data["machine"] and "loadavg" in data["machine"]
    csv = (tmp_path / "bench.csv").read_text().splitlines()
    assert len(csv) == 3 and "impl" in csv[0] and "x_naive" in csv[0]
    assert "THP" in capsys.readouterr().out


def test_main_cli(tmp_path):
    assert bench.main(["--sizes", "32x100", "--impls", "kdlit_inplace", "--repeats", "1", "--threads", "1",
                       "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "bench.csv").exists()
    with pytest.raises(SystemExit): bench.main(["--impls", "nope"])
    with pytest.raises(SystemExit): bench.main("--impls", "nope")   # as `kdlit bench` passes its arguments
