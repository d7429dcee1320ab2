"Integration tests of kdlit.distiller on tiny random Llama pairs (fast) and on the real teacher (slow)."
import copy, csv, json, math, pathlib

import pytest
import torch
from torch import nn

from kdlit.data import make_loaders
from kdlit.distiller import (Callback, CancelFitException, CheckpointCB, Distiller, EvalCB, ProgressCB, find_checkpoint,
                             make_accelerator, warmup_cosine)
from kdlit.models import tiny_pair
from kdlit.safeguards import TrainingDiverged

TEXT = ("Knowledge distillation trains a small student to match the softened output distribution of a large "
        "teacher. The temperature flattens both distributions; the T squared factor keeps gradient scales. ") * 30
CUR = dict(kd=1.0, lm=0.5)


def setup(seed=0, batch_size=4, block_size=32, **kw):
    teacher, student, tok = tiny_pair(seed=seed, **kw)
    dls = make_loaders(tok, [TEXT], block_size=block_size, batch_size=batch_size, n_valid=4, seed=seed)
    return teacher, student, dls


def distiller(*, seed=0, batch_size=4, curriculum=CUR, pair_kw=None, **kw):
    torch.manual_seed(seed)
    teacher, student, dls = setup(seed, batch_size, **(pair_kw or {}))
    kw = dict(dict(lr=3e-3, precision="no", verbose=False, curriculum=curriculum), **kw)
    return Distiller(teacher, student, dls, **kw)


def params(d): return {k: v.detach().clone() for k, v in d.accelerator.unwrap_model(d.student).state_dict().items()}


def max_diff(a, b): return max(float((a[k] - b[k]).abs().max()) for k in a)


class At(Callback):
    "Run `fn(learn)` at `event` when `learn.step` is in `steps`."
    order = 100
    def __init__(self, event, steps, fn):
        self.steps, self.fn = set(steps), fn
        setattr(self, event, self._call)
    def _call(self, learn):
        if learn.step in self.steps: self.fn(learn)


# ---------------------------------------------------------------- training works
def test_fit_reduces_loss():
    d = distiller().fit(40)
    assert len(d.history) == 40
    first = sum(r["loss"] for r in d.history[:3]) / 3
    last = sum(r["loss"] for r in d.history[-3:]) / 3
    assert last < 0.8 * first
    assert d.evals[-1]["val_lm"] < d.evals[0]["val_lm"]
    assert d.evals[0]["step"] == 0 and d.evals[-1]["step"] == 40
    assert d.teacher_eval is not None and "val_ppl" in d.teacher_eval


def test_ce_only_never_runs_the_teacher_in_training():
    d = distiller(curriculum=dict(kd=0.0, lm=1.0), cbs=[EvalCB(every=100, at_start=False)])
    calls = []
    d.teacher.register_forward_hook(lambda *a: calls.append(1))
    d.fit(5)
    assert "kd" not in d.history[0] and "lm" in d.history[0]
    assert len(calls) == 2 * len(d.dls.valid)   # only at the final evaluation: its baseline and val_kd
    assert not d.need_teacher


def test_components_are_weighted_logged_and_trained():
    class Scale(nn.Module):
        "A toy alignment loss with a trainable parameter: (a * mean h_s - mean h_t)^2."
        name, needs_hidden_states, needs_attentions = "feat", True, False
        def __init__(self): super().__init__(); self.a = nn.Parameter(torch.tensor(0.5))
        def forward(self, s_out, t_out, mask):
            return (self.a * s_out.hidden_states[-1][mask].mean() - t_out.hidden_states[-1][mask].mean()) ** 2
    comp = Scale()
    d = distiller(components=[comp], curriculum=dict(kd=1.0, lm=0.5, feat=("linear", 1.0, 0.0)))
    d.fit(6)
    r = d.history[2]
    assert {"feat", "feat_weighted", "w_feat"} <= set(r)
    assert math.isclose(r["feat_weighted"], r["w_feat"] * r["feat"], rel_tol=1e-6)
    assert math.isclose(d.history[0]["w_feat"], 1.0) and math.isclose(d.history[-1]["w_feat"], 0.0)
    assert float(comp.a.detach()) != 0.5
    assert d.need_hidden and not d.need_attn


def test_a_frozen_component_is_not_prepared(monkeypatch):
    "Only components with trainable parameters go through accelerator.prepare (DDP refuses a module with nothing to train)."
    from accelerate import Accelerator
    class Frozen(nn.Module):
        name, needs_hidden_states, needs_attentions = "feat", True, False
        def __init__(self): super().__init__(); self.a = nn.Parameter(torch.tensor(0.5), requires_grad=False)
        def forward(self, s_out, t_out, mask): return (self.a * s_out.hidden_states[-1][mask].mean()) ** 2
    prepared, orig = [], Accelerator.prepare
    monkeypatch.setattr(Accelerator, "prepare", lambda self, *a, **k: (prepared.extend(a), orig(self, *a, **k))[1])
    comp = Frozen()
    d = distiller(components=[comp], curriculum=dict(kd=1.0, lm=0.5, feat=0.1))
    assert not any(m is comp for m in prepared) and d.component_modules[0] is comp
    d.fit(2)
    assert float(comp.a) == 0.5 and all(p is not comp.a for p in d.params)


def test_attention_component_switches_to_eager():
    from kdlit.alignment import alignment_components
    teacher, student, dls = setup(pair_kw=dict(attn_implementation="sdpa"))
    comps = alignment_components(student, teacher, ["attn"])
    d = Distiller(teacher, student, dls, components=comps, curriculum=dict(kd=1.0, attn=0.1), precision="no",
                  verbose=False, cbs=[EvalCB(at_start=False)])
    assert d.need_attn and teacher.config._attn_implementation == "eager"
    d.fit(2)
    assert "attn" in d.history[-1] and math.isfinite(d.history[-1]["attn"])


# ---------------------------------------------------------------- gradient accumulation
class ListLoaders:
    "Plain loaders over a fixed list of examples with unevenly masked labels (no kdlit sampler)."
    def __init__(self, batch_size, n=8, seq=24, vocab=257, seed=0):
        g = torch.Generator().manual_seed(seed)
        ex = []
        for i in range(n):
            ids = torch.randint(0, vocab, (seq,), generator=g)
            labels = ids.clone(); labels[: 3 * i] = -100          # very different valid counts per row
            ex.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
        self.train = torch.utils.data.DataLoader(ex, batch_size=batch_size, shuffle=False)
        self.valid = torch.utils.data.DataLoader(ex[:2], batch_size=2)


@pytest.mark.parametrize("bs,accum", [(4, 2), (2, 4), (1, 8)])
def test_grad_accum_equals_large_batch(bs, accum):
    def one_step(bs, accum):
        torch.manual_seed(0)
        teacher, student, _ = setup()
        d = Distiller(teacher, student, ListLoaders(bs), grad_accum=accum, lr=1.0, max_grad_norm=None,
                      opt_func=lambda ps, lr: torch.optim.SGD(ps, lr=lr), precision="no", verbose=False,
                      cbs=[EvalCB(every=100, at_start=False)], curriculum=CUR)
        p0 = params(d)
        d.fit(1)
        p1 = params(d)
        return {k: p1[k] - p0[k] for k in p0}, d.history[0]
    big, rb = one_step(8, 1)
    small, rs = one_step(bs, accum)
    assert max(float(v.abs().max()) for v in big.values()) > 1e-4            # the step did move the weights
    assert max_diff(big, small) < 1e-6
    assert rb["tokens"] == rs["tokens"]
    for k in ("loss", "kd", "lm", "grad_norm"): assert math.isclose(rb[k], rs[k], rel_tol=1e-5), k


# ---------------------------------------------------------------- mixed precision
def _cpu_autocast_ok(dtype):
    try:
        with torch.autocast("cpu", dtype=dtype): y = torch.ones(2, 2) @ torch.ones(2, 2)
        return y.dtype == dtype
    except Exception: return False


@pytest.mark.parametrize("prec,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_runs_on_cpu(prec, dtype):
    if not _cpu_autocast_ok(dtype): pytest.skip(f"this torch has no CPU autocast for {dtype}")
    d = distiller(precision=prec, grad_accum=2).fit(8)
    assert d.accelerator.mixed_precision == prec
    assert all(math.isfinite(r["loss"]) for r in d.history)
    assert d.evals[-1]["val_lm"] < d.evals[0]["val_lm"]
    if prec == "fp16":
        assert d.scaler is not None and d.scaler.is_enabled()
        with d.accelerator.autocast(): assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


def test_fp16_scaler_overflow_is_skipped_by_scaler_not_counted(tmp_path):
    if not _cpu_autocast_ok(torch.float16): pytest.skip("no CPU fp16 autocast")
    d = distiller(precision="fp16")
    d.scaler._init_scale = 2.0 ** 120                   # the first backward overflows the fp16 gradients
    d.fit(4)
    assert d.history[0]["skipped"] == 1
    assert d.guard.n_skipped == 0 and d.guard.n_scaler_skips >= 1
    assert d.scaler.get_scale() < 2.0 ** 120
    assert math.isfinite(d.history[-1]["loss"])


# ---------------------------------------------------------------- checkpoints and resume
def _run(steps, *, ckpt=None, resume=None, stop_at=None, every=5, **kw):
    stop = At("after_step", [stop_at] if stop_at else [], lambda l: (_ for _ in ()).throw(KeyboardInterrupt()))
    ev = [EvalCB(every=kw.pop("eval_every"))] if "eval_every" in kw else []
    d = distiller(cbs=[stop, *ev, *([CheckpointCB(ckpt, every=every)] if ckpt else [])], **kw)
    try: d.fit(steps, resume=resume)
    except KeyboardInterrupt: pass
    return d


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(tmp_path, accum):
    full = _run(20, grad_accum=accum, eval_every=5)
    part = _run(20, ckpt=tmp_path, stop_at=12, grad_accum=accum, eval_every=5)   # Ctrl-C after step 12
    assert len(part.history) == 12
    assert find_checkpoint(tmp_path).name == "step-0000010"                       # last complete checkpoint
    cont = _run(20, ckpt=tmp_path, resume=tmp_path, grad_accum=accum, eval_every=5)
    assert len(cont.history) == 20
    for a, b in zip(full.history, cont.history):
        for k in ("loss", "kd", "lm", "grad_norm", "lr", "T"): assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k)
    assert [e["val_lm"] for e in full.evals] == pytest.approx([e["val_lm"] for e in cont.evals], abs=1e-6)
    assert max_diff(params(full), params(cont)) <= 1e-6
    layout = sorted(p.name for p in find_checkpoint(tmp_path).iterdir())
    for f in ("kdlit_meta.json", "kdlit_state.pt", "model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        assert f in layout
    meta = json.loads((find_checkpoint(tmp_path) / "kdlit_meta.json").read_text())
    assert meta["step"] == 20 and meta["n_steps"] == 20 and meta["format"] == "kdlit-checkpoint"


def test_interrupt_while_saving_keeps_last_checkpoint(tmp_path):
    d = distiller(cbs=[CheckpointCB(tmp_path, every=3), EvalCB(every=100)])
    real = d.accelerator.save_state
    def boom(out):
        real(out)
        if d.step == 6: raise KeyboardInterrupt          # killed mid-checkpoint, after accelerate wrote its files
    d.accelerator.save_state = boom
    with pytest.raises(KeyboardInterrupt): d.fit(9)
    assert find_checkpoint(tmp_path).name == "step-0000003"
    cont = _run(9, ckpt=tmp_path, resume=tmp_path, every=3, eval_every=100)
    assert len(cont.history) == 9 and cont.history[3]["step"] == 4


def test_cancel_fit_is_clean():
    d = distiller(cbs=[At("after_step", [3], lambda l: (_ for _ in ()).throw(CancelFitException()))])
    d.fit(10)
    assert d.step == 3 and len(d.history) == 3


def test_bad_checkpoints_fail_clearly(tmp_path):
    d = distiller(cbs=[CheckpointCB(tmp_path / "ck")]).fit(3)
    ck = find_checkpoint(tmp_path / "ck")
    with pytest.raises(ValueError, match="does not match"):       # a different student
        distiller(pair_kw=dict(hidden_size=48)).fit(3, resume=ck)
    with pytest.raises(ValueError, match="not a kdlit checkpoint"):
        distiller().fit(3, resume=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        distiller().fit(3, resume=tmp_path / "missing")
    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        distiller().fit(3, resume=ck)
    (ck / "kdlit_meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        distiller().fit(3, resume=ck)


# ---------------------------------------------------------------- the guard
def _nan_logits(learn):
    h = learn.accelerator.unwrap_model(learn.student).register_forward_hook(
        lambda m, i, out: (setattr(out, "logits", out.logits * float("nan")), out)[1])
    learn._hook = h


def _unhook(learn):
    if getattr(learn, "_hook", None) is not None: learn._hook.remove(); learn._hook = None


class Snapshot(Callback):
    "Parameters and optimizer step counts before and after chosen steps."
    order = 90
    def __init__(self, steps): self.steps, self.before, self.after = set(steps), {}, {}
    def _opt(self, learn): return [float(s["step"]) for s in learn.opt.optimizer.state.values() if "step" in s]
    def before_step(self, learn):
        if learn.step in self.steps: self.before[learn.step] = (params(learn), self._opt(learn))
    def after_step(self, learn):
        if learn.step - 1 in self.steps: self.after[learn.step - 1] = (params(learn), self._opt(learn))


@pytest.mark.parametrize("prec", ["no", "fp16"])
def test_injected_nan_logits_are_skipped(prec):
    if prec == "fp16" and not _cpu_autocast_ok(torch.float16): pytest.skip("no CPU fp16 autocast")
    snap = Snapshot([4])
    d = distiller(precision=prec, fused=False, cbs=[At("before_step", [4], _nan_logits), At("after_step", [5], _unhook), snap])
    d.fit(10)
    assert d.history[4]["skipped"] == 1 and sum(r["skipped"] for r in d.history) == 1
    (p0, o0), (p1, o1) = snap.before[4], snap.after[4]
    assert max_diff(p0, p1) == 0 and o0 == o1                 # weights and optimizer state untouched
    assert d.guard.n_skipped == 1 and d.guard.anomalies[0].step == 4
    assert math.isfinite(d.history[-1]["loss"]) and d.history[-1]["lr"] > 0
    assert d.monitor.counts["nonfinite"] >= 1


def _nan_hidden(learn):
    dec = learn.accelerator.unwrap_model(learn.student).get_decoder()
    learn._hook = dec.register_forward_hook(
        lambda m, i, out: (setattr(out, "last_hidden_state", out.last_hidden_state * float("nan")), out)[1])


def test_injected_nan_hidden_states_are_skipped_on_the_fused_path():
    snap = Snapshot([4])
    d = distiller(cbs=[At("before_step", [4], _nan_hidden), At("after_step", [5], _unhook), snap])
    assert d.fused
    d.fit(8)
    assert d.history[4]["skipped"] == 1 and sum(r["skipped"] for r in d.history) == 1
    (p0, o0), (p1, o1) = snap.before[4], snap.after[4]
    assert max_diff(p0, p1) == 0 and o0 == o1                 # weights and optimizer state untouched
    assert math.isfinite(d.history[-1]["loss"])


def test_injected_inf_gradient_is_skipped():
    snap = Snapshot([3])
    def inf_grad(learn):
        p = next(learn.accelerator.unwrap_model(learn.student).parameters())
        learn._hook = p.register_hook(lambda g: g * float("inf"))
    d = distiller(cbs=[At("before_step", [3], inf_grad), At("after_step", [4], _unhook), snap])
    d.fit(8)
    assert d.history[3]["skipped"] == 1 and not math.isfinite(d.history[3]["grad_norm"])
    (p0, o0), (p1, o1) = snap.before[3], snap.after[3]
    assert max_diff(p0, p1) == 0 and o0 == o1
    assert [a.component for a in d.guard.anomalies] == ["grad_norm"]


@pytest.mark.parametrize("fused", [False, True])
def test_consecutive_faults_raise_training_diverged(fused):
    d = distiller(fused=fused, cbs=[At("before_step", [2], _nan_hidden if fused else _nan_logits)])
    with pytest.raises(TrainingDiverged): d.fit(20)
    assert d.guard.n_skipped == d.guard.max_consecutive


# ---------------------------------------------------------------- configuration errors
class Named(nn.Module):
    needs_hidden_states = needs_attentions = False
    def __init__(self, name): super().__init__(); self.name = name
    def forward(self, s, t, m): return torch.zeros(())


@pytest.mark.parametrize("kw,msg", [
    (dict(precision="fp12"), "precision"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(lr=-1.0), "lr"),
    (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(sched_func="cosine"), "sched_func"),
    (dict(curriculum=dict(kd=0.0, lm=0.0)), "nothing to train"),
    (dict(curriculum="kd"), "curriculum"),
    (dict(temperature=0.0), "temperature"),
    (dict(components=[Named("foo")]), "not an alignment weight"),
    (dict(components=[Named("feat"), Named("feat")], curriculum=dict(kd=1.0, feat=0.1)), "share the name"),
    (dict(components=[nn.Linear(2, 2)]), "name"),
])
def test_bad_configuration_fails_fast(kw, msg):
    teacher, student, dls = setup()
    with pytest.raises(ValueError, match=msg): Distiller(teacher, student, dls, verbose=False, **kw)


def test_callbacks_check_their_settings():
    for make, msg in [(lambda: CheckpointCB(".", every=0), "every"), (lambda: CheckpointCB(".", keep=0), "keep"),
                      (lambda: EvalCB(every=-1), "every"), (lambda: EvalCB(batches=0), "batches"),
                      (lambda: ProgressCB(every=0), "every"), (lambda: warmup_cosine(warmup=1.5), "warmup")]:
        with pytest.raises(ValueError, match=msg): make()


def test_bad_pairs_and_fit_arguments():
    teacher, _, dls = setup()
    _, other, _ = tiny_pair(vocab_size=128)          # the tokenizer (257 ids) does not fit the student
    with pytest.raises(ValueError, match="vocabulary"): Distiller(teacher, other, dls, verbose=False)
    _, padded, _ = tiny_pair(vocab_size=300)         # a padded vocabulary is fine: logits are sliced to 257
    assert Distiller(teacher, padded, dls, verbose=False).vocab_size == 257
    with pytest.raises(ValueError, match="dls"): Distiller(teacher, other, [1, 2], verbose=False)
    d = distiller()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="steps"): d.fit(bad)
    assert d.step == 0 and d.history == []


def test_precision_switch_in_one_process():
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


# ---------------------------------------------------------------- outputs
def test_history_rows_and_csv(tmp_path):
    d = distiller(cbs=[EvalCB(every=4)], sched_func=warmup_cosine(warmup=2), temperature=("linear", 2.0, 1.0), fused=False).fit(9)   # logits path: logit watch
    h = d.history
    keys = {"step", "p", "loss", "kd", "kd_weighted", "w_kd", "lm", "lm_weighted", "w_lm", "D", "T", "T2", "lr",
            "grad_norm", "max_logit_student", "max_logit_teacher", "skipped", "tokens", "step_time"}
    assert keys <= set(h[0])
    assert [r["step"] for r in h] == list(range(1, 10))
    assert h[0]["T"] == 2.0 and h[-1]["T"] == 1.0 and math.isclose(h[4]["T"], 1.5)
    for r in h:
        assert math.isclose(r["D"] * r["T"] ** 2, r["kd"], rel_tol=1e-9) and math.isclose(r["T2"], r["T"] ** 2)
        assert math.isclose(r["loss"], r["kd_weighted"] + r["lm_weighted"], rel_tol=1e-5)
        assert r["tokens"] == 4 * 31 and r["max_logit_student"] > 0
    assert h[1]["lr"] > h[0]["lr"] and h[-1]["lr"] < h[2]["lr"]                   # warm-up, then cosine decay
    assert [r["step"] for r in h if "val_lm" in r] == [4, 8, 9]
    assert math.isclose(h[3]["val_ppl"], math.exp(h[3]["val_lm"]), rel_tol=1e-9)
    rows = list(csv.DictReader(open(d.save_history(tmp_path / "h.csv"))))
    assert len(rows) == 9 and rows[0]["val_lm"] == "" and float(rows[3]["val_lm"]) == pytest.approx(h[3]["val_lm"])
    assert float(rows[5]["kd"]) == pytest.approx(h[5]["kd"], rel=1e-12)
    assert any(l.startswith("[CURRICULUM] Step 4 (44%)") for l in d.logs)
    assert "gap closed" in d.summary() or "teacher" in d.summary()
    fig = d.plot_history()
    assert len(fig.axes) == 4


def test_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = distiller().fit(3)
    d.save_pretrained(tmp_path / "student")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = next(iter(d.dls.valid))["input_ids"]
    with torch.no_grad():
        ref = d.accelerator.unwrap_model(d.student).eval()(input_ids=ids).logits
        assert torch.allclose(m(input_ids=ids).logits, ref, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(tmp_path / "student")
    assert len(tok) == len(d.tokenizer)


# ---------------------------------------------------------------- the real teacher
@pytest.mark.slow
def test_real_teacher_kd_beats_ce_only():
    """The default recipe (`DEFAULT_RECIPE`, chosen by nbs/92_recipe_study.ipynb) against CE-only on the study's measure:
    same student, batches, order and schedule; the mean LM loss over the validation split and out-of-domain text
    (the standard library's docstrings) must be lower for the default, and so must the out-of-domain loss alone."""
    from kdlit.models import default_teacher, make_student
    from kdlit.data import stdlib_docstrings, tokenize_texts, pack_blocks
    from kdlit.losses import lm_loss
    teacher, tok = default_teacher()
    base = make_student(teacher, n_layers=10)
    dls = make_loaders(tok, block_size=64, batch_size=4, n_valid=16, seed=0)
    sets = dict(valid=dls.valid_blocks, ood=pack_blocks(tokenize_texts(stdlib_docstrings(), tok), 64)[:16])
    def losses(m):
        with torch.no_grad(): return {k: float(lm_loss(m(input_ids=b).logits[:, :-1], b[:, 1:])) for k, b in sets.items()}
    out = {}
    for name, recipe in (("default", {}), ("ce", dict(curriculum=dict(kd=0.0, lm=1.0)))):
        dls = make_loaders(tok, block_size=64, batch_size=4, n_valid=16, seed=0)   # same blocks, same order
        d = Distiller(teacher, copy.deepcopy(base), dls, precision="no", verbose=False, cbs=[EvalCB(every=1000, at_start=False)], **recipe)
        d.fit(STEPS_REAL)
        out[name] = losses(d.student.eval())
    mean = {k: (v["valid"] + v["ood"]) / 2 for k, v in out.items()}
    assert mean["default"] < mean["ce"] and out["default"]["ood"] < out["ce"]["ood"], out


STEPS_REAL = 30


# ---------------------------------------------------------------- two processes (DDP on CPU through Accelerate)
DDP_SCRIPT = r'''
import sys, torch
from accelerate import notebook_launcher
def train(out, bs, n):
    import torch
    from kdlit.distiller import Distiller, EvalCB
    from kdlit.models import tiny_pair
    sys.path.insert(0, sys.argv[2]); from test_distiller import ListLoaders, CUR
    torch.manual_seed(0)
    teacher, student, tok = tiny_pair(seed=0)
    d = Distiller(teacher, student, ListLoaders(bs), lr=1.0, max_grad_norm=None, opt_func=lambda ps, lr: torch.optim.SGD(ps, lr=lr),
                  precision="no", verbose=False, cbs=[EvalCB(every=100, at_start=False)], curriculum=CUR)
    d.fit(n)
    if d.accelerator.is_main_process:
        torch.save(dict(params=d.accelerator.unwrap_model(d.student).state_dict(), history=d.history), out)
if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[3])
    if sys.argv[4] == "2": notebook_launcher(train, (out, 2, n), num_processes=2)
    else: train(out, 4, n)
'''


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    import os, subprocess, sys
    script = tmp_path / "ddp.py"; script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    res = {}
    for nproc in ("1", "2"):
        out = tmp_path / f"out{nproc}.pt"
        r = subprocess.run([sys.executable, str(script), str(out), str(pathlib.Path(__file__).parent), "2", nproc],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res[nproc] = torch.load(out)
    a, b = res["1"], res["2"]
    assert max(float((a["params"][k] - b["params"][k]).abs().max()) for k in a["params"]) < 1e-5
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["tokens"] == rb["tokens"] and math.isclose(ra["loss"], rb["loss"], rel_tol=1e-5)


# ---------------------------------------------------------------- fused loss path

@pytest.mark.parametrize("accum", [1, 2])
def test_fused_matches_unfused(accum):
    runs = [distiller(fused=f, grad_accum=accum, cbs=[EvalCB(at_start=False)]).fit(4) for f in (False, True)]
    for a, b in zip(*(d.history for d in runs)):
        for k in ("loss", "kd", "lm", "D", "grad_norm"): assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
        assert b["max_logit_student"] is None and b["skipped"] == 0
    assert max_diff(*(params(d) for d in runs)) < 1e-5


def test_fused_ce_only_matches_unfused():
    cur = dict(kd=0.0, lm=1.0)
    runs = [distiller(fused=f, curriculum=cur, cbs=[EvalCB(at_start=False)]).fit(3) for f in (False, True)]
    for a, b in zip(*(d.history for d in runs)):
        assert "kd" not in b and abs(a["lm"] - b["lm"]) < 1e-5 and abs(a["loss"] - b["loss"]) < 1e-5
    assert max_diff(*(params(d) for d in runs)) < 1e-5


def test_fused_bad_configs_fail_clearly():
    teacher, student, dls = setup()
    student.lm_head = nn.Linear(student.config.hidden_size, student.config.vocab_size, bias=True)
    with pytest.raises(ValueError, match="bias"): Distiller(teacher, student, dls, precision="no", fused=True)
    teacher, student, dls = setup()
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"): Distiller(teacher, student, dls, precision="no", fused=True)
    teacher, student, dls = setup()
    student.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="get_output_embeddings"): Distiller(teacher, student, dls, precision="no", fused=True)
    teacher, student, dls = setup()
    with pytest.raises(ValueError, match="fused"): Distiller(teacher, student, dls, precision="no", fused="yes")


def test_fused_is_the_default_where_it_applies():
    d = distiller()
    assert d.fused is True                                  # plain linear heads, one process, fp32
    d.fit(2)
    assert d.history[-1]["max_logit_student"] is None and math.isfinite(d.history[-1]["loss"])
    assert distiller(fused=False).fused is False            # the switch
    teacher, student, dls = setup()
    student.lm_head = nn.Linear(student.config.hidden_size, student.config.vocab_size, bias=True)
    assert Distiller(teacher, student, dls, precision="no", verbose=False).fused is False   # a biased head: logits path
    teacher, student, dls = setup()
    teacher.config.final_logit_softcapping = 30.0           # the teacher's logits are soft-capped: logits path
    assert Distiller(teacher, student, dls, precision="no", verbose=False).fused is False
    assert Distiller(teacher, student, dls, precision="no", verbose=False, curriculum=dict(kd=0.0, lm=1.0)).fused is True
    if _cpu_autocast_ok(torch.float16):                     # fp16 keeps the logits for its largest-|logit| watch
        assert distiller(precision="fp16").fused is False


def test_fused_with_component_matches_unfused():
    class Scale(nn.Module):
        name, needs_hidden_states, needs_attentions = "feat", True, False
        def __init__(self): super().__init__(); self.a = nn.Parameter(torch.tensor(0.5))
        def forward(self, s_out, t_out, mask):
            return (self.a * s_out.hidden_states[-1][mask].mean() - t_out.hidden_states[-1][mask].mean()) ** 2
    cur = dict(kd=1.0, lm=0.5, feat=("linear", 1.0, 0.0))
    runs = [distiller(fused=f, components=[Scale()], curriculum=cur, cbs=[EvalCB(at_start=False)]).fit(4) for f in (False, True)]
    for a, b in zip(*(d.history for d in runs)):
        for k in ("loss", "kd", "lm", "feat"): assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    assert max_diff(*(params(d) for d in runs)) < 1e-5
    assert abs(float(runs[0].components[0].a.detach()) - float(runs[1].components[0].a.detach())) < 1e-5


def test_progress_bar_in_a_terminal(capsys):
    "progress=True outside a notebook: fastprogress's console bar, no live plot, and the fit completes."
    d = distiller(cbs=[ProgressCB(bar=True)])
    d.fit(3)
    assert d.step == 3
    out = capsys.readouterr()
    assert "3/3" in out.out + out.err


def test_grad_scaler_settings_reach_the_cpu_scaler():
    d = distiller(precision="fp16", accelerator=make_accelerator("fp16", grad_scaler=dict(init_scale=2.0**8, growth_interval=50)))
    assert d.accelerator.scaler is not None and d.accelerator.scaler.get_scale() == 256.0
    assert d.accelerator.scaler._growth_interval == 50
    d.fit(2)
    assert math.isfinite(d.history[-1]["loss"])
    with pytest.raises(ValueError, match="grad_scaler"): make_accelerator("fp16", grad_scaler=dict(scale=3))
    with pytest.raises(ValueError, match="init_scale"): make_accelerator("fp16", grad_scaler=dict(init_scale=0))
    with pytest.raises(TypeError, match="grad_scaler"):              # a setting of the accelerator, not of the Distiller
        distiller(precision="fp16", grad_scaler=dict(init_scale=8.0), accelerator=make_accelerator("fp16"))


# ---------------------------------------------------------------- the loss interface is pluggable
def test_a_given_loss_source_is_the_step_s_loss():
    from kdlit.distiller import LogitsKD, LossSource
    class Counting(LogitsKD):
        calls = 0
        def __call__(self, learn, batch, num_items): Counting.calls += 1; return super().__call__(learn, batch, num_items)
    src = Counting()
    d = distiller(loss=src, grad_accum=2)
    assert d.loss_fn is src and not d.fused
    plain = distiller(fused=False, grad_accum=2).fit(3)
    d.fit(3)
    assert Counting.calls == 6                       # one call per micro-batch
    assert [r["loss"] for r in d.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-6)
    with pytest.raises(ValueError, match="loss: expected a kdlit.distiller.LossSource"): distiller(loss=lambda *a: 0)
    assert issubclass(Counting, LossSource)


# ---------------------------------------------------------------- the signature: a Recipe, loss=, precision=, and the shorthands
import dataclasses, re
from kdlit.distiller import (DEFAULT_RECIPE, RECIPE_FIELDS, SHORTHANDS, LogitsKD, Recipe, UnknownArgument, eval_model,
                             use_fused)
from kdlit.schedules import Curriculum, TemperatureSchedule


def built(**kw):
    torch.manual_seed(0)
    teacher, student, dls = setup()
    return Distiller(teacher, student, dls, lr=3e-3, verbose=False, cbs=[EvalCB(at_start=False)], **kw)


def state(d):
    "What a user can read off a built Distiller: the recipe and its settings, the loss interface, the precision."
    return (d.recipe, type(d.loss_fn), d.fused, d.accelerator.mixed_precision, d.temperature, d.curriculum, d.divergence,
            d.beta, d.active, d.need_teacher, d.need_hidden, d.need_attn, tuple(d.components), d.tokenizer is d.dls.tokenizer)


@pytest.mark.parametrize("short,shorthand", [          # lambdas: accelerators are made when the test runs, not at collection
    (lambda: dict(recipe=Recipe(CUR, 1.0, "jsd", 0.3), loss="logits", precision="no"),
     lambda: dict(curriculum=CUR, temperature=1.0, divergence="jsd", beta=0.3, fused=False, precision="no")),
    (lambda: dict(recipe=dict(curriculum=CUR, temperature=["linear", 2.0, 1.0]), loss="fused", precision=make_accelerator("no")),
     lambda: dict(curriculum=CUR, temperature=("linear", 2.0, 1.0), fused=True, accelerator=make_accelerator("no"))),
    (lambda: dict(recipe=Recipe.ce_only(), precision="no"), lambda: dict(curriculum=dict(kd=0.0, lm=1.0), precision="no")),
])
def test_short_form_and_shorthands_build_the_same_run(short, shorthand):
    a, b = built(**short()), built(**shorthand())
    assert state(a) == state(b)
    a.fit(2); b.fit(2)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]     # the same steps, bit for bit
    assert max_diff(params(a), params(b)) == 0


def test_shorthands_on_top_of_a_recipe():
    d = built(recipe=Recipe.seed(), temperature=1.0, precision="no")
    assert d.recipe == dataclasses.replace(Recipe.seed(), temperature=1.0)
    assert d.curriculum == Curriculum.seed() and d.temperature(0.0) == d.temperature(1.0) == 1.0
    assert built(precision="no").recipe == Recipe() == Recipe(**DEFAULT_RECIPE)      # no recipe: DEFAULT_RECIPE's
    same = built(recipe=Recipe.seed(), curriculum=None, temperature=None, divergence=None, precision="no")   # None: not given
    assert same.recipe == Recipe.seed()


def test_seed_recipe_is_the_cli_s():
    from kdlit.cli import SEED_RECIPE, curriculum_spec, make_temperature
    r = Recipe.seed()
    assert r.curriculum == Curriculum(curriculum_spec("seed"))
    assert r.temperature == make_temperature(SEED_RECIPE["temperature"]) and r.divergence == SEED_RECIPE["divergence"]


@pytest.mark.parametrize("kw,msg", [
    (dict(divergence="kl"), r"^divergence: expected one of forward_kl, reverse_kl, jsd"),
    (dict(temperature="2:x"), r"^temperature: "),
    (dict(temperature=("linear", 2.0, -1.0)), r"^temperature: temperature must stay > 0"),
    (dict(temperature={"kind": "warp"}), r"^temperature: "),
    (dict(beta=1.5), r"^beta: expected a number in \[0, 1\]"),
    (dict(curriculum=[("kd", 1.0)]), r"^curriculum: expected a Curriculum"),
    (dict(curriculum=dict(kd=-0.5)), r"^curriculum: "),
    (dict(curriculum=dict(kd=0.0, lm=0.0)), r"^curriculum: .*nothing to train"),
])
def test_recipe_checks_itself_in_one_line(kw, msg):
    with pytest.raises(ValueError, match=msg) as e: Recipe(**kw)
    assert "\n" not in str(e.value)
    teacher, student, dls = setup()
    with pytest.raises(ValueError, match=msg): Distiller(teacher, student, dls, recipe=kw, verbose=False)   # the same check


def test_recipe_reads_back_and_stays_checked():
    r = Recipe(dict(kd=0.5, lm=0.5), ["linear", 2.0, 1.5])
    assert repr(r) == "Recipe(curriculum={'kd': 0.5, 'lm': 0.5}, temperature=linear(2.0, 1.5), divergence='forward_kl')"
    r2 = Recipe(dict(kd=0.9, lm=0.1), 1.0, "jsd", 0.2)
    assert repr(r2).endswith("divergence='jsd', beta=0.2)") and eval(repr(r2), {"Recipe": Recipe}) == r2
    with pytest.raises(dataclasses.FrozenInstanceError): r.divergence = "not one"
    assert (Recipe().need_teacher, Recipe.ce_only().need_teacher) == (True, False)
    assert RECIPE_FIELDS == ("curriculum", "temperature", "divergence", "beta", "components")


def test_unknown_keyword_is_one_clear_error_before_any_work():
    with pytest.raises(ValueError) as e: Distiller(None, None, None, temprature=1.0)    # before the models are looked at
    msg = str(e.value)
    assert isinstance(e.value, TypeError) and isinstance(e.value, UnknownArgument) and "\n" not in msg
    assert "unexpected keyword argument 'temprature' (did you mean 'temperature'?)" in msg
    assert all(name in msg for name in ("recipe", "loss", "precision", "cbs", *SHORTHANDS))
    with pytest.raises(ValueError, match="'temprature' is not a field of a Recipe"): built(recipe=dict(temprature=1.0))


@pytest.mark.parametrize("kw,msg", [
    (lambda: dict(loss="fused", fused=False), "fused: fused=False disagrees with loss='fused'"),
    (lambda: dict(loss=LogitsKD(), fused=True), "fused: fused=True disagrees with loss=LogitsKD"),
    (lambda: dict(loss="chunked"), "loss: expected a kdlit.distiller.LossSource, 'fused', 'logits' or None, got 'chunked'"),
    (lambda: dict(fused="yes"), "fused: expected True, False or None"),
    (lambda: dict(precision="bf16", accelerator=make_accelerator("no")), "precision: 'bf16', but the given accelerator runs 'no'"),
    (lambda: dict(precision=make_accelerator("no"), accelerator=make_accelerator("no")), "accelerator: given twice"),
    (lambda: dict(accelerator="bf16"), "accelerator: expected an accelerate.Accelerator"),
    (lambda: dict(recipe="seed"), "recipe: expected a kdlit.distiller.Recipe"),
])
def test_folded_arguments_that_disagree_fail(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)): built(**kw())
    assert built(loss=LogitsKD(), fused=False, precision="no").fused is False     # agreeing is fine


def test_public_names_for_other_modules():
    "What kdlit.hf uses: `eval_model` (the Distiller's own evaluation) and `use_fused`; hf.py imports no private Distiller names for them."
    import kdlit.hf as H
    assert H.eval_model is eval_model and H.use_fused is use_fused and H.Recipe is Recipe
    d = built(precision="no")
    ev = eval_model(d, d.student, max_batches=1)
    assert {"val_lm", "val_ppl", "val_kd"} <= set(ev) and ev["val_lm"] == d.eval_loss(d.valid_dl, max_batches=1)["val_lm"]
    assert "val_kd" not in eval_model(d, d.teacher, max_batches=1)                   # never KL(teacher ‖ teacher)
    assert use_fused(None, d.student, d.teacher, True, d.accelerator) is True


def test_make_accelerator_resets_accelerate_only_for_another_precision(monkeypatch):
    "The one edit of Accelerate's private state: only where Accelerate would refuse another precision in one process."
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    make_accelerator("no")
    calls, real = [], AcceleratorState._reset_state
    monkeypatch.setattr(AcceleratorState, "_reset_state", staticmethod(lambda *a: (calls.append(a), real(*a))[1]))
    make_accelerator("no"); make_accelerator(None)
    assert calls == []                                           # the same precision, or none asked: the state stands
    acc = make_accelerator("bf16")
    assert calls == [()] and acc.mixed_precision == "bf16"       # AcceleratorState only (PartialState kept)
    with pytest.raises(ValueError, match="already been initialized"): Accelerator(mixed_precision="no")  # Accelerate alone refuses
    d = distiller(precision="no").fit(1)                        # a Distiller of another precision, same process
    assert len(calls) == 2 and d.accelerator.mixed_precision == "no" and acc.mixed_precision == "no"  # the old one follows
