"""StepGuard under real fault injection: a tiny Llama teacher/student distillation loop, NaN/inf injected into the
teacher logits, the student logits, a decoder layer's hidden state and a gradient, plus an all-masked batch, in fp32
and in fp16 CPU autocast with a GradScaler. The bad step must leave weights and optimizer state bit-identical,
training must continue and end finite, the report must name the step and component, and k consecutive faults must
raise TrainingDiverged."""
import copy, math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdlit.losses import kd_loss, lm_loss
from kdlit.safeguards import Anomaly, LogitRangeMonitor, StepGuard, TrainingDiverged

torch.set_num_threads(1)
V, B, L = 128, 2, 16
FAULT_STEP = 3


def _cpu_fp16_supported():
    try:
        lin = torch.nn.Linear(4, 4)
        with torch.autocast("cpu", dtype=torch.float16):
            y = lin(torch.randn(2, 4))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        scaler.scale(y.float().sum()).backward(); scaler.step(opt); scaler.update()
        return y.dtype == torch.float16
    except Exception:
        return False


FP16_OK = _cpu_fp16_supported()
PRECISIONS = ["fp32", pytest.param("fp16", marks=pytest.mark.skipif(
    not FP16_OK, reason="this torch build has no CPU fp16 autocast / torch.amp.GradScaler('cpu')"))]


def tiny_llama(seed, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def snapshot(model, opt, scaler=None):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            None if scaler is None else scaler.get_scale())


def identical(a, b):
    (w1, o1, _), (w2, o2, _) = a, b
    if any(not torch.equal(w1[k], w2[k]) for k in w1): return False
    s1, s2 = o1["state"], o2["state"]
    return s1.keys() == s2.keys() and all(
        torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])) for i in s1 for k in s1[i])


def distill(precision="fp32", fault=None, fault_steps=(FAULT_STEP,), n_steps=7, api="guarded_step", guard=None):
    """A real KD loop (teacher frozen, student trained) with `fault` injected at `fault_steps`.
    Returns the guard, per-step records and snapshots around the first fault step."""
    teacher, student = tiny_llama(0).eval(), tiny_llama(1)
    for p in teacher.parameters(): p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    fp16 = precision == "fp16"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if fp16 else None
    guard = guard or StepGuard(max_consecutive=3, max_scaler_skips=3, on_anomaly=None)
    params = list(student.parameters())
    g = torch.Generator().manual_seed(0)
    state = {"step": -1}

    def hidden_hook(mod, inp, out):
        if state["step"] not in fault_steps or fault not in ("hidden_nan", "hidden_inf"): return None
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, 2, :] = math.nan if fault == "hidden_nan" else math.inf
        return (h, *out[1:]) if isinstance(out, tuple) else h
    student.model.layers[0].register_forward_hook(hidden_hook)

    wgrad = student.model.layers[0].mlp.down_proj.weight
    def grad_hook(gr):
        if state["step"] not in fault_steps or fault not in ("grad_nan", "grad_inf"): return None
        gr = gr.clone(); gr[0, 0] = math.nan if fault == "grad_nan" else math.inf
        return gr
    wgrad.register_hook(grad_hook)

    recs, snaps = [], {}
    for step in range(n_steps):
        state["step"] = step
        ids = torch.randint(0, V, (B, L), generator=g)
        labels = ids[:, 1:].clone()
        bad = step in fault_steps
        if bad and fault == "all_masked": labels[:] = -100
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            with torch.no_grad(): t_logits = teacher(input_ids=ids).logits[:, :-1]
            s_logits = student(input_ids=ids).logits[:, :-1]
        if bad and fault in ("teacher_nan", "teacher_inf"):
            t_logits = t_logits.clone(); t_logits[1, 4, 7] = math.nan if fault == "teacher_nan" else math.inf
        if bad and fault in ("student_nan", "student_inf"):
            s_logits = s_logits.clone(); s_logits[0, 5, 9] = math.nan if fault == "student_nan" else math.inf
        kd = kd_loss(s_logits, t_logits, labels, temperature=2.0)
        lm = lm_loss(s_logits, labels)
        loss = 0.5 * kd + 0.5 * lm
        parts = {"kd": kd, "lm": lm}
        if step == min(fault_steps): snaps["before"] = snapshot(student, opt, scaler)
        if api == "guarded_step":
            stepped = guard.guarded_step(opt, loss, step=step, losses=parts, max_norm=1.0, scaler=scaler,
                                         scheduler=sched, student_logits=s_logits, teacher_logits=t_logits)
        else:   # the primitive calls, as a trainer (e.g. kdlit's Distiller on Accelerate) makes them
            ok = guard.check_losses(step, {**parts, "total": loss}, student_logits=s_logits, teacher_logits=t_logits)
            if ok:
                (scaler.scale(loss) if fp16 else loss).backward()
                if fp16: scaler.unscale_(opt)
                gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
                ok = guard.check_grads(step, gn, scaler=scaler)
                if ok: scaler.step(opt) if fp16 else opt.step()
                if fp16: scaler.update()
            opt.zero_grad(set_to_none=True)
            if guard.end_step(step, skipped=not ok): sched.step()
            stepped = ok
        if step == min(fault_steps): snaps["after"] = snapshot(student, opt, scaler)
        recs.append(dict(step=step, stepped=stepped, kd=kd.item(), lm=lm.item(), loss=loss.item()))
    finite = all(p.isfinite().all() for p in student.parameters())
    return dict(guard=guard, recs=recs, snaps=snaps, finite=finite, sched=sched, scaler=scaler)


LOSS_FAULTS = ["teacher_nan", "teacher_inf", "student_nan", "student_inf", "hidden_nan", "hidden_inf"]
EXPECTED_COMPONENTS = {"teacher_nan": {"kd", "total"}, "teacher_inf": {"kd", "total"},
                       "student_nan": {"kd", "lm", "total"}, "student_inf": {"kd", "lm", "total"},
                       "hidden_nan": {"kd", "lm", "total"}, "hidden_inf": {"kd", "lm", "total"}}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fault", LOSS_FAULTS)
def test_loss_fault_skips_step(precision, fault):
    r = distill(precision, fault)
    guard, recs, snaps = r["guard"], r["recs"], r["snaps"]
    assert recs[FAULT_STEP]["stepped"] is False
    assert not math.isfinite(recs[FAULT_STEP]["loss"])
    assert identical(snaps["before"], snaps["after"]), "the bad step changed weights or optimizer state"
    if precision == "fp16": assert snaps["before"][2] == snaps["after"][2], "a bad loss must not touch the scaler"
    # training continued and ended finite
    assert all(rec["stepped"] for rec in recs[FAULT_STEP + 1:]) and r["finite"]
    assert all(math.isfinite(rec["loss"]) for rec in recs if rec["step"] != FAULT_STEP)
    # the report names the step and the component
    assert {a.step for a in guard.anomalies} == {FAULT_STEP}
    assert {a.component for a in guard.anomalies} == EXPECTED_COMPONENTS[fault]
    assert all(a.counted and a.kind in ("nan", "inf") for a in guard.anomalies)
    assert guard.n_skipped == 1 and guard.consecutive == 0
    assert r["sched"].last_epoch == len(recs) - 1            # the skipped step did not advance the scheduler
    a = guard.anomalies[0]
    assert a.dtype == ("float16" if precision == "fp16" else "float32")
    assert a.student_max_abs_logit is not None and a.teacher_max_abs_logit is not None
    if fault == "teacher_inf": assert a.teacher_max_abs_logit == math.inf
    text = guard.report()
    assert f"\n{FAULT_STEP} " in text and "kd" in text


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fault", ["grad_nan", "grad_inf"])
def test_grad_fault_skips_step(precision, fault):
    r = distill(precision, fault)
    guard, recs, snaps = r["guard"], r["recs"], r["snaps"]
    assert recs[FAULT_STEP]["stepped"] is False and math.isfinite(recs[FAULT_STEP]["loss"])
    assert identical(snaps["before"], snaps["after"])
    assert all(rec["stepped"] for rec in recs[FAULT_STEP + 1:]) and r["finite"]
    (a,) = guard.anomalies
    assert (a.step, a.component) == (FAULT_STEP, "grad_norm")
    if precision == "fp16":   # the scaler's own skip: recorded, not counted as a guard anomaly, scale lowered
        assert a.kind == "scaler_overflow" and not a.counted
        assert guard.n_scaler_skips == 1 and guard.n_skipped == 0
        assert snaps["after"][2] == snaps["before"][2] / 2
    else:
        assert a.kind == ("nan" if fault == "grad_nan" else "inf") and a.counted
        assert guard.n_skipped == 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_all_masked_batch_is_not_an_anomaly(precision):
    r = distill(precision, "all_masked")
    rec = r["recs"][FAULT_STEP]
    assert rec["kd"] == 0.0 and rec["lm"] == 0.0            # kd_loss/lm_loss: 0 with a finite gradient
    assert rec["stepped"] and r["guard"].anomalies == [] and r["guard"].n_skipped == 0
    assert r["finite"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("api", ["guarded_step", "primitives"])
def test_consecutive_faults_raise(precision, api):
    faults = range(2, 10)
    with pytest.raises(TrainingDiverged) as ei:
        distill(precision, "student_nan", fault_steps=faults, n_steps=10, api=api)
    report = ei.value.report
    assert all(isinstance(a, Anomaly) for a in report)
    assert sorted({a.step for a in report}) == [2, 3, 4]     # max_consecutive=3
    assert "3 consecutive anomalous steps" in str(ei.value) and "student" not in str(ei.value).split("\n")[0]


@pytest.mark.parametrize("api", ["guarded_step", "primitives"])
def test_consecutive_scaler_skips_raise(api):
    if not FP16_OK: pytest.skip("no CPU fp16 autocast / GradScaler('cpu')")
    with pytest.raises(TrainingDiverged, match="consecutive GradScaler skips") as ei:
        distill("fp16", "grad_inf", fault_steps=range(2, 10), n_steps=10, api=api)
    assert [a.kind for a in ei.value.report] == ["scaler_overflow"] * 3


@pytest.mark.parametrize("precision", PRECISIONS)
def test_primitives_match_guarded_step(precision):
    a = distill(precision, "teacher_nan", api="guarded_step")
    b = distill(precision, "teacher_nan", api="primitives")
    assert [repr(r["loss"]) for r in a["recs"]] == [repr(r["loss"]) for r in b["recs"]]
    assert [(x.step, x.component, x.kind) for x in a["guard"].anomalies] == \
           [(x.step, x.component, x.kind) for x in b["guard"].anomalies]


def test_interrupted_fault_streak_does_not_raise():
    # faults at 1, 2, 4, 5: never 3 in a row
    r = distill("fp32", "teacher_inf", fault_steps=(1, 2, 4, 5), n_steps=8)
    assert r["guard"].n_skipped == 4 and r["finite"]


def test_guard_state_dict_survives_a_checkpoint():
    r = distill("fp32", "student_inf", fault_steps=(1, 2))
    g = r["guard"]
    g2 = StepGuard(max_consecutive=3, on_anomaly=None)
    g2.load_state_dict(copy.deepcopy(g.state_dict()))
    assert g2.report() == g.report() and g2.anomalies == g.anomalies
    # a resumed guard continues the consecutive count
    g3 = StepGuard(max_consecutive=3, on_anomaly=None)
    g3.load_state_dict({**g.state_dict(), "consecutive": 2})
    g3.check_losses(10, {"kd": math.nan})
    with pytest.raises(TrainingDiverged): g3.end_step(10)


def test_external_skip_is_recorded_not_counted():
    g = StepGuard(max_consecutive=1, max_scaler_skips=None, on_anomaly=None)
    for s in range(5):
        assert g.check_losses(s, {"kd": 1.0}) and g.check_grads(s, torch.tensor(0.5))
        assert g.end_step(s, skipped=True) is False       # e.g. accelerator.optimizer_step_was_skipped
    assert g.n_scaler_skips == 5 and g.n_skipped == 0 and [a.kind for a in g.anomalies] == ["skipped"] * 5


def test_anomaly_warnings_are_live():
    with pytest.warns(RuntimeWarning, match="step 7: kd is nan"):
        g = StepGuard()
        g.check_losses(7, {"kd": torch.tensor(math.nan)})
    seen = []
    g = StepGuard(on_anomaly=seen.append)
    g.check_grads(2, math.inf)
    assert seen[0].component == "grad_norm" and seen[0].kind == "inf"


def test_logit_range_monitor_on_real_logits():
    teacher = tiny_llama(0)
    with torch.no_grad():
        logits = teacher(input_ids=torch.randint(0, V, (1, 8))).logits
        mon = LogitRangeMonitor(torch.float16, warn_frac=0.5, on_warn=None)
        r = mon.update(0, logits, logits)
        assert r["warn"] is False and r["student"] == logits.abs().max().item()
        teacher.lm_head.weight.mul_(1e5)                  # logits blow up toward the fp16 maximum
        r = mon.update(1, None, teacher(input_ids=torch.randint(0, V, (1, 8))).logits)
    assert r["warn"] is True and r["student"] is None and r["frac"] > 0.5
    assert [h["step"] for h in mon.history] == [0, 1]
