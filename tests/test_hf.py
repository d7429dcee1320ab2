"Integration tests of kdlit.hf: KDTrainer against the Distiller, gradient accumulation, the fault matrix, resume, LoRA, TRL, DDP."
import copy, json, math, os, pathlib, subprocess, sys

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from kdlit.alignment import ContrastiveAlignment, FeatureAlignment, layer_map
from kdlit.data import make_loaders
from kdlit.distiller import Callback, Distiller, EvalCB, adamw, warmup_cosine
from kdlit.hf import KD_COMPONENTS, KD_STATE, KDTrainer, kd_trainer, lm_batch, loader_examples, lora_student, save_student
from kdlit.models import tiny_pair
from kdlit.safeguards import TrainingDiverged

TEXT = ("Knowledge distillation trains a small student to match the softened output distribution of a large "
        "teacher. The temperature flattens both distributions; the T squared factor keeps gradient scales. ") * 30


def setup(seed=0, batch_size=4):
    teacher, student, tok = tiny_pair(seed=seed)
    return teacher, student, tok, make_loaders(tok, [TEXT], block_size=32, batch_size=batch_size, n_valid=4, seed=seed)


def targs(out, steps=5, **kw):
    base = dict(max_steps=steps, per_device_train_batch_size=4, learning_rate=3e-3, max_grad_norm=1.0, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, train_sampling_strategy="sequential",
                disable_tqdm=True, remove_unused_columns=False, log_level="error", seed=0)
    return TrainingArguments(str(out), **{**base, **kw})


def opts(model, steps=5, lr=3e-3, components=()):
    opt = adamw()([p for m in (model, *components) for p in m.parameters() if p.requires_grad], lr)   # the Distiller's `params`
    return opt, warmup_cosine()(opt, steps)


def state(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}


def max_diff(a, b): return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------- the same step as the Distiller
@pytest.mark.parametrize("fused", [False, True])
def test_per_step_losses_equal_the_distillers(tmp_path, fused):
    teacher, student, tok, dls = setup()
    s2 = copy.deepcopy(student)
    cur, temp = dict(kd=("linear", 1.0, 0.3), lm=0.5), ("linear", 3.0, 1.0)     # curricula that move every step
    d = Distiller(teacher, student, dls, lr=3e-3, precision="no", verbose=False, fused=fused, curriculum=cur,
                  temperature=temp, cbs=[EvalCB(every=100, at_start=False)]).fit(5)
    ds = loader_examples(setup()[3].train, 5)                                 # the Distiller's batches, in its order
    tr = KDTrainer(s2, targs(tmp_path), teacher=teacher, fused=fused, curriculum=cur, temperature=temp,
                   train_dataset=ds, optimizers=opts(s2))
    assert tr.fused == fused and tr.accelerator.mixed_precision == "no"
    tr.train()
    assert len(tr.history) == 5
    for a, b in zip(d.history, tr.history):
        assert a["step"] == b["step"]
        for k in ("loss", "kd", "lm", "D", "kd_weighted", "lm_weighted"): assert b[k] == pytest.approx(a[k], abs=1e-5), k
        assert (b["T"], b["T2"], b["w_kd"]) == (a["T"], a["T2"], a["w_kd"])
    assert max_diff(state(d.accelerator.unwrap_model(d.student)), state(s2)) < 1e-5
    logged = [r for r in tr.state.log_history if "loss" in r]
    assert all({"T", "T2", "kd", "D", "lm", "w_kd", "kd_weighted", "lm_weighted"} <= set(r) for r in logged)
    assert logged[2]["T"] == pytest.approx(2.0) and logged[2]["D"] == pytest.approx(logged[2]["kd"] / 4.0)


class MeanGap(torch.nn.Module):
    "A parameter-free alignment loss: (mean h_s - mean h_t)^2 over valid positions."
    name, needs_hidden_states, needs_attentions = "feat", True, False
    def forward(self, s_out, t_out, mask):
        return (s_out.hidden_states[-1][mask].mean() - t_out.hidden_states[-1][mask].mean()) ** 2


def test_alignment_components_are_weighted_as_in_the_distiller(tmp_path):
    teacher, student, tok, dls = setup(batch_size=2)
    s2 = copy.deepcopy(student)
    cur = dict(kd=1.0, lm=0.5, feat=("linear", 2.0, 0.5))
    d = Distiller(teacher, student, dls, lr=3e-3, precision="no", verbose=False, fused=False, curriculum=cur, grad_accum=2,
                  components=[MeanGap()], cbs=[EvalCB(every=100, at_start=False)]).fit(4)
    tr = KDTrainer(s2, targs(tmp_path, steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2), teacher=teacher,
                   fused=False, curriculum=cur, components=[MeanGap()], train_dataset=loader_examples(setup(batch_size=2)[3].train, 8),
                   optimizers=opts(s2, 4))
    tr.train()
    for a, b in zip(d.history, tr.history):
        for k in ("loss", "feat", "feat_weighted", "w_feat"): assert b[k] == pytest.approx(a[k], abs=1e-5), k
    assert any("feat_weighted" in r for r in tr.state.log_history)


def wide_pair():
    "The tiny student (width 32) and a wider teacher (48) on the same byte vocabulary: alignment needs learned projections."
    teacher, student, tok, dls = setup(batch_size=2)
    return tiny_pair(hidden_size=48, seed=1).teacher, student, tok, dls


def trainable_components():
    torch.manual_seed(0)
    return [FeatureAlignment(32, 48, layer_map(2, 4)), ContrastiveAlignment(32, 48, proj_dim=16)]


def test_trainable_components_train_as_in_the_distiller(tmp_path):
    teacher, student, tok, dls = wide_pair()
    comps = trainable_components()
    s2, c2 = copy.deepcopy(student), copy.deepcopy(comps)
    p0 = state(torch.nn.ModuleList(comps))
    cur = dict(kd=("linear", 1.0, 0.5), lm=0.5, feat=("linear", 2.0, 0.5), contr=0.3)
    d = Distiller(teacher, student, dls, lr=3e-3, precision="no", verbose=False, fused=False, curriculum=cur, grad_accum=2,
                  components=comps, cbs=[EvalCB(every=100, at_start=False)]).fit(5)
    tr = KDTrainer(s2, targs(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2), teacher=teacher,
                   fused=False, curriculum=cur, components=c2, train_dataset=loader_examples(wide_pair()[3].train, 10),
                   optimizers=opts(s2, components=c2))
    tr.train()
    assert len(tr.history) == 5
    for a, b in zip(d.history, tr.history):
        for k in ("loss", "kd", "lm", "feat", "feat_weighted", "contr", "contr_weighted"): assert b[k] == pytest.approx(a[k], abs=1e-5), k
    logged = [r["grad_norm"] for r in tr.state.log_history if "loss" in r]   # one norm (clipped) over student and projections
    assert logged == pytest.approx([float(r["grad_norm"]) for r in d.history], rel=1e-4)
    assert max_diff(state(d.accelerator.unwrap_model(d.student)), state(s2)) < 1e-5
    assert max_diff(state(torch.nn.ModuleList(comps)), state(torch.nn.ModuleList(c2))) < 1e-5
    assert max_diff(p0, state(torch.nn.ModuleList(c2))) > 1e-3                      # the projections trained
    assert all(p.grad is None for c in c2 for p in c.parameters())                  # cleared after each step
    out = tmp_path / "student"; tr.save_model(str(out))                             # training-only: not in the saved student
    from safetensors.torch import load_file
    assert set(load_file(out / "model.safetensors")) <= set(s2.state_dict())


def test_resume_with_trainable_components_equals_an_uninterrupted_run(tmp_path):
    teacher, student, tok, dls = wide_pair()
    comps, cur = trainable_components()[:1], dict(kd=("linear", 1.0, 0.2), lm=0.5, feat=1.0)
    ex = loader_examples(dls.train, 12)
    def make(out, cs, **kw):            # the Trainer's own optimizer (create_optimizer) and LR schedule
        return KDTrainer(copy.deepcopy(student), targs(out, steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3,
                                                       weight_decay=0.1, **kw),
                         teacher=teacher, fused=False, curriculum=cur, components=cs, train_dataset=ex)
    full = make(tmp_path / "full", copy.deepcopy(comps)); full.train()
    n_opt = sum(len(g["params"]) for g in full.optimizer.param_groups)
    assert n_opt == len(list(full.model.parameters())) + len(list(comps[0].parameters()))   # the projections are optimised
    assert {g["weight_decay"] for g in full.optimizer.param_groups} == {0.0, 0.1}
    make(tmp_path / "cut", copy.deepcopy(comps)).train()                            # writes checkpoint-3 and checkpoint-6
    ck = tmp_path / "cut" / "checkpoint-3"
    assert (ck / KD_COMPONENTS).exists()
    c_again = copy.deepcopy(comps)                                                  # fresh projections: the checkpoint's come back
    again = make(tmp_path / "cut", c_again)
    again.train(resume_from_checkpoint=str(ck))
    assert [r["step"] for r in again.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full.history[3:], again.history[3:]):
        for k in ("loss", "kd", "lm", "feat"): assert b[k] == pytest.approx(a[k], abs=1e-6), k
    assert max_diff(state(full.model), state(again.model)) < 1e-6
    assert max_diff(state(full.components[0]), state(c_again[0])) < 1e-6
    assert max_diff(state(comps[0]), state(c_again[0])) > 1e-3
    other = make(tmp_path / "cut", [FeatureAlignment(32, 48, [1])])
    with pytest.raises(ValueError, match="alignment components"): other.train(resume_from_checkpoint=str(ck))


def test_evaluation_reports_lm_perplexity_and_the_teachers_baseline(tmp_path):
    teacher, student, tok, dls = setup()
    valid = loader_examples(dls.valid, 1)
    tr = KDTrainer(student, targs(tmp_path, steps=2), teacher=teacher, train_dataset=loader_examples(dls.train, 2),
                   eval_dataset=valid)
    tr.train()
    d = Distiller(teacher, tr.model, dls, verbose=False, precision="no")
    ref_s, ref_t = d.evaluate(), d.teacher_eval
    ev = tr.evaluate()
    assert ev["eval_lm_loss"] == pytest.approx(ref_s["val_lm"], rel=1e-6) and ev["eval_loss"] == ev["eval_lm_loss"]
    assert ev["eval_ppl"] == pytest.approx(math.exp(ev["eval_lm_loss"]), rel=1e-9)
    assert ev["eval_kd_T1"] == pytest.approx(ref_s["val_kd"], rel=1e-5)
    assert ev["eval_teacher_ppl"] == pytest.approx(ref_t["val_ppl"], rel=1e-6)
    assert any("eval_ppl" in r for r in tr.state.log_history)


# ---------------------------------------------------------------- gradient accumulation
def test_grad_accum_4x1_equals_1x4(tmp_path):
    teacher, student, tok, dls = setup()
    ex = loader_examples(dls.train, 3)
    for i, e in enumerate(ex):                    # uneven valid counts per example: a per-micro-batch mean would differ
        e["labels"] = e["labels"].clone(); e["labels"][: 4 * (i % 4) + 1] = -100
    runs = []
    for bs, ga in ((4, 1), (1, 4)):
        s = copy.deepcopy(student)
        tr = KDTrainer(s, targs(tmp_path / f"{bs}x{ga}", steps=3, per_device_train_batch_size=bs, gradient_accumulation_steps=ga),
                       teacher=teacher, fused=False, train_dataset=ex, optimizers=opts(s, 3))
        assert tr.accelerator.mixed_precision == "no"
        tr.train()
        runs.append((tr, state(s)))
    (a, pa), (b, pb) = runs
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], abs=1e-5)
    assert max_diff(pa, pb) < 1e-5


# ---------------------------------------------------------------- faults never reach the weights
class Snap(TrainerCallback):
    "Weights before and after optimizer step `k` (0-based), and the LR before/after it."
    def __init__(self, model, k): self.model, self.k, self.before = model, k, None
    def on_step_begin(self, args, state, control, optimizer=None, **kw):
        if state.global_step == self.k: self.before, self.lr0 = state_of(self.model), optimizer.param_groups[0]["lr"]
    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step == self.k + 1: self.after, self.lr1 = state_of(self.model), optimizer.param_groups[0]["lr"]


def state_of(m): return {n: p.detach().clone() for n, p in m.named_parameters()}


def inject(tr, kind, k):
    "Install fault `kind` in the second micro-batch of optimizer step k (the first one's gradient must be dropped too)."
    seen = []
    def at():
        if not (tr.state.global_step == k and tr.model.training): return False
        seen.append(1)
        return len(seen) == 2
    nan = float("nan")
    if kind in ("teacher_nan", "teacher_inf"):
        v = nan if kind == "teacher_nan" else float("inf")
        def hook(m, i, o):
            if at(): o.logits[0, 3, 5] = v
            return o
        tr.teacher.register_forward_hook(hook)
    elif kind == "hidden_nan":
        tr.model.get_decoder().norm.register_forward_hook(lambda m, i, o: o * nan if at() else o)
    elif kind == "grad_nan":
        p = tr.model.get_decoder().layers[0].mlp.up_proj.weight
        p.register_hook(lambda g: g * nan if at() else g)
    else: raise ValueError(kind)


FAULTS = [("teacher_nan", False, "no"), ("teacher_inf", False, "no"), ("hidden_nan", False, "no"), ("hidden_nan", True, "no"),
          ("grad_nan", False, "no"), ("grad_nan", True, "no"), ("teacher_nan", False, "bf16"), ("hidden_nan", True, "bf16"),
          ("grad_nan", False, "bf16"), ("teacher_nan", False, "fp16"), ("hidden_nan", True, "fp16"), ("grad_nan", False, "fp16")]


@pytest.mark.parametrize("kind,fused,precision", FAULTS)
def test_fault_matrix(tmp_path, kind, fused, precision):
    teacher, student, tok, dls = setup()
    k = 2
    tr = KDTrainer(student, targs(tmp_path, steps=5, bf16=precision == "bf16", fp16=precision == "fp16", gradient_accumulation_steps=2,
                                  per_device_train_batch_size=2),
                   teacher=teacher, fused=fused, train_dataset=loader_examples(dls.train, 5), optimizers=opts(student))
    assert tr.accelerator.mixed_precision == precision
    snap = Snap(tr.model, k); tr.add_callback(snap)
    inject(tr, kind, k)
    tr.train()
    assert [r["skipped"] for r in tr.history] == [0, 0, 1, 0, 0]
    by_scaler = kind == "grad_nan" and precision == "fp16"      # fp16: an inf/NaN gradient is the GradScaler's to skip
    assert (tr.guard.n_skipped, tr.guard.n_scaler_skips) == ((0, 1) if by_scaler else (1, 0)) and tr.guard.anomalies[0].step == k
    if precision == "fp16": assert tr.accelerator.scaler is not None and tr.accelerator.scaler.is_enabled()
    assert max_diff(snap.before, snap.after) == 0.0            # the faulty step moved nothing
    assert snap.lr1 == snap.lr0                                 # and did not advance the LR schedule
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    assert max_diff(snap.after, state_of(tr.model)) > 0         # training went on
    assert any("[GUARD]" in m for m in tr.kd_logs)
    assert [r["skipped_steps"] for r in tr.state.log_history if "loss" in r][-1] == (0 if by_scaler else 1)


def test_all_masked_batch_is_a_finite_zero(tmp_path):
    teacher, student, tok, dls = setup()
    ex = loader_examples(dls.train, 3)
    for e in ex[4:8]: e["labels"] = torch.full_like(e["labels"], -100)   # step 1 has no valid target at all
    tr = KDTrainer(student, targs(tmp_path, steps=3), teacher=teacher, train_dataset=ex, optimizers=opts(student, 3))
    tr.train()
    r = tr.history[1]
    assert r["skipped"] == 0 and r["loss"] == 0.0 and r["kd"] == 0.0 and r["lm"] == 0.0 and math.isfinite(r["grad_norm"])
    assert tr.guard.n_skipped == 0 and all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_repeated_faults_raise_training_diverged(tmp_path):
    teacher, student, tok, dls = setup()
    tr = KDTrainer(student, targs(tmp_path, steps=8), teacher=teacher, fused=False, train_dataset=loader_examples(dls.train, 8),
                   optimizers=opts(student, 8))
    tr.teacher.register_forward_hook(lambda m, i, o: o.__setitem__("logits", o.logits * float("nan")) or o)
    with pytest.raises(TrainingDiverged, match="consecutive"): tr.train()


# ---------------------------------------------------------------- checkpoints and resume
def test_resume_continues_the_curricula(tmp_path):
    teacher, student, tok, dls = setup()
    cur, temp, ex = dict(kd=("linear", 1.0, 0.2), lm=0.5), ("linear", 3.0, 1.0), loader_examples(dls.train, 6)
    def make(out, s):
        return KDTrainer(s, targs(out, steps=6, save_strategy="steps", save_steps=3), teacher=teacher, fused=False,
                         curriculum=cur, temperature=temp, train_dataset=ex, optimizers=opts(s, 6))
    full = make(tmp_path / "full", copy.deepcopy(student)); full.train()
    first = make(tmp_path / "cut", copy.deepcopy(student))
    first.args.max_steps = 6
    first.train()                                            # writes checkpoint-3 and checkpoint-6
    ck = tmp_path / "cut" / "checkpoint-3"
    assert (ck / KD_STATE).exists() and len(json.loads((ck / KD_STATE).read_text())["history"]) == 3
    again = make(tmp_path / "cut", copy.deepcopy(student))
    again.train(resume_from_checkpoint=str(ck))
    assert len(again.history) == 6 and [r["step"] for r in again.history] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full.history[3:], again.history[3:]):
        assert (b["T"], b["w_kd"], b["p"]) == (a["T"], a["w_kd"], a["p"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert again.history[3]["T"] == pytest.approx(3.0 - 2.0 * 3 / 5)
    other = KDTrainer(copy.deepcopy(student), targs(tmp_path / "cut", steps=6), teacher=teacher, temperature=2.0,
                      curriculum=cur, train_dataset=ex)
    with pytest.raises(ValueError, match="recipe"): other.train(resume_from_checkpoint=str(ck))


# ---------------------------------------------------------------- LoRA students
def test_lora_student_in_kdtrainer_trains_only_its_adapter_and_reloads(tmp_path):
    PeftModel = pytest.importorskip("peft").PeftModel
    from transformers import AutoModelForCausalLM
    teacher, student, tok, dls = setup()
    ls = lora_student(student, r=4, alpha=8)
    before = state(ls)
    tr = KDTrainer(ls, targs(tmp_path, steps=4, learning_rate=1e-2), teacher=teacher, train_dataset=loader_examples(dls.train, 4),
                   processing_class=tok)
    assert tr.fused                                             # the fused path works through the peft wrapper
    tr.train()
    after = state(ls)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    names = {id(p): n for n, p in ls.named_parameters()}
    assert all("lora_" in names[id(p)] for g in tr.optimizer.param_groups for p in g["params"])   # only adapters are optimized
    out = save_student(ls, tmp_path / "adapter", merged=tmp_path / "merged", tokenizer=tok)
    assert (out["adapter"] / "adapter_config.json").exists() and not (out["adapter"] / "model.safetensors").exists()
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    ls.eval()
    with torch.no_grad():
        ref = ls(x).logits
        merged = AutoModelForCausalLM.from_pretrained(out["merged"])
        assert float((merged(x).logits - ref).abs().max()) < 1e-5
        base = tiny_pair(seed=0).student
        assert float((PeftModel.from_pretrained(base, out["adapter"])(x).logits - ref).abs().max()) < 1e-6
    assert not any("lora_" in k for k in merged.state_dict())


def test_lora_student_in_the_distiller_fused_and_guarded(tmp_path):
    pytest.importorskip("peft")
    teacher, student, tok, dls = setup()
    ls = lora_student(student, r=4)
    before = state(ls)
    class Bad(Callback):
        def before_fit(self, learn):
            learn.accelerator.unwrap_model(learn.student).get_decoder().norm.register_forward_hook(
                lambda m, i, o: o * float("nan") if learn.step == 2 else o)
    d = Distiller(teacher, ls, dls, lr=1e-2, precision="no", verbose=False, fused=True, cbs=[EvalCB(every=100, at_start=False), Bad()])
    assert d.fused
    d.fit(4)
    assert [r["skipped"] for r in d.history] == [0, 0, 1, 0] and d.guard.n_skipped == 1
    changed = {k for k, v in state(ls).items() if not torch.equal(before[k], v)}
    assert changed and all("lora_" in k for k in changed)
    out = d.save_pretrained(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists()


# ---------------------------------------------------------------- bad settings fail first, in one line
@pytest.mark.parametrize("kw,msg", [
    (dict(divergence="kl"), "divergence: expected one of"),
    (dict(temperature=-1.0), "temperature:"),
    (dict(curriculum=dict(kd=0.0, lm=0.0)), "curriculum:"),
    (dict(teacher="SmolLM2"), "teacher: expected the teacher as a torch nn.Module"),
    (dict(fused="yes"), "fused: expected True, False or None"),
])
def test_bad_settings_fail_before_training(tmp_path, kw, msg):
    teacher, student, tok, dls = setup()
    kw = {"teacher": teacher, **kw}
    with pytest.raises(ValueError, match=msg) as e:
        KDTrainer(student, targs(tmp_path), train_dataset=loader_examples(dls.train, 1), **kw)
    assert "\n" not in str(e.value)


def test_a_teacher_whose_vocabulary_does_not_fit(tmp_path):
    teacher, student, tok, dls = setup()
    small = tiny_pair(vocab_size=64).teacher
    for t in (dict(processing_class=tok), {}):
        with pytest.raises(ValueError, match="^teacher: ") as e:
            KDTrainer(student, targs(tmp_path), teacher=small, train_dataset=loader_examples(dls.train, 1), **t)
        assert "\n" not in str(e.value)


def test_an_optimizer_without_the_components_and_bad_lora_settings_are_refused(tmp_path):
    teacher, student, tok, dls = wide_pair()
    comps = trainable_components()[:1]
    with pytest.raises(ValueError, match=r"^optimizers: .*\['feat'\]") as e:
        KDTrainer(student, targs(tmp_path), teacher=teacher, curriculum=dict(kd=1.0, lm=0.5, feat=1.0), components=comps,
                  train_dataset=loader_examples(dls.train, 1), optimizers=opts(student))
    assert "\n" not in str(e.value)
    for kw, msg in ((dict(r=0), "^r: "), (dict(alpha=0), "^alpha: "), (dict(dropout=1.5), "^dropout: "), (dict(target_modules=[]), "^target_modules: ")):
        with pytest.raises(ValueError, match=msg): lora_student(student, **kw)
    with pytest.raises(ValueError, match="^base: "): kd_trainer(dict)


# ---------------------------------------------------------------- TRL
def test_trl_gkd_trainer_with_kdlits_loss_matches_kdtrainer(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import default_data_collator
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    teacher, student, tok, dls = setup()
    s2 = copy.deepcopy(student)
    ex = loader_examples(dls.train, 5)
    a = KDTrainer(student, targs(tmp_path / "a"), teacher=teacher, train_dataset=ex, optimizers=opts(student))
    a.train()
    common = {k: v for k, v in targs(tmp_path).to_dict().items() if k in ("max_steps", "per_device_train_batch_size", "learning_rate",
              "max_grad_norm", "use_cpu", "save_strategy", "logging_steps", "train_sampling_strategy", "disable_tqdm", "seed")}
    cfg = GKDConfig(str(tmp_path / "b"), lmbda=0.0, seq_kd=False, bf16=False, report_to="none", **common)   # off-policy; TRL's default is bf16
    hds = datasets.Dataset.from_list([{k: v.tolist() for k, v in e.items()} for e in ex])
    b = kd_trainer(GKDTrainer)(s2, args=cfg, teacher=teacher, train_dataset=hds, processing_class=tok,
                               data_collator=default_data_collator, optimizers=opts(s2))
    b.train()
    assert [r["loss"] for r in b.history] == pytest.approx([r["loss"] for r in a.history], abs=1e-5)
    assert b.teacher_model is not None and b.history[0]["T"] == 2.0


def test_trl_distillation_trainer_on_policy_with_kdlits_loss(tmp_path):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DistillationConfig, DistillationTrainer
    teacher, student, tok, dls = setup()
    tok.padding_side = "left"
    ds = datasets.Dataset.from_list([{"prompt": p} for p in ["The teacher", "A student learns", "Knowledge is", "Temperature"] * 4])
    cfg = DistillationConfig(str(tmp_path), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                             disable_tqdm=True, bf16=False, max_completion_length=8)
    before = state(student)
    tr = kd_trainer(DistillationTrainer)(student, args=cfg, teacher=teacher, train_dataset=ds, processing_class=tok,
                                         divergence="jsd", temperature=1.0, curriculum=dict(kd=1.0, lm=0.0))
    tr.train()
    assert len(tr.history) == 2 and all(r["skipped"] == 0 for r in tr.history)
    # completions of the whole accumulated generation batch are the divisor: the student's LM loss per token is about
    # ln V for a random tiny model (twice that if each of the 2 micro-batches were divided by its own count)
    assert all(abs(r["lm"] - math.log(257)) < 0.5 for r in tr.history)
    assert all(0 <= r["kd"] < 0.1 and r["D"] == r["kd"] for r in tr.history)
    assert max_diff(before, state(student)) > 0


def test_lm_batch_passes_plain_batches_through():
    b = dict(input_ids=torch.ones(1, 3, dtype=torch.long), labels=torch.ones(1, 3, dtype=torch.long))
    assert lm_batch(b) == (b, None)


# ---------------------------------------------------------------- DDP (two CPU processes, gloo)
DDP_SCRIPT = '''
import sys, tempfile, json, torch
from transformers import TrainingArguments
from kdlit.alignment import FeatureAlignment, layer_map
from kdlit.models import tiny_pair
from kdlit.data import make_loaders
from kdlit.distiller import adamw, warmup_cosine
from kdlit.hf import KDTrainer, loader_examples
out, bs, feat = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["feat"]
teacher, student, tok = tiny_pair(seed=0)
dls = make_loaders(tok, [%r], block_size=32, batch_size=4, n_valid=4, seed=0)
ex = loader_examples(dls.train, 3)
comps, kw = [], {}
if feat:      # a wider teacher and a trainable projection; 2 accumulated micro-batches (each process's component stays unsynced
    teacher = tiny_pair(hidden_size=48, seed=1).teacher                                 # until the last one)
    torch.manual_seed(0); comps = [FeatureAlignment(32, 48, layer_map(2, 4))]
    kw = dict(components=comps, curriculum=dict(kd=1.0, lm=0.5, feat=1.0))
else:         # uneven valid targets per process: the divisor must be the global count
    for i, e in enumerate(ex): e["labels"] = e["labels"].clone(); e["labels"][: 4 * (i %% 4) + 1] = -100
opt = adamw()([p for m in (student, *comps) for p in m.parameters() if p.requires_grad], 3e-3)
a = TrainingArguments(tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=bs, learning_rate=3e-3, use_cpu=True,
                      report_to="none", save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True,
                      remove_unused_columns=False, log_level="error", gradient_accumulation_steps=2 if feat else 1)
tr = KDTrainer(student, a, teacher=teacher, fused=False, train_dataset=ex, optimizers=(opt, warmup_cosine()(opt, 3)), **kw)
tr.train()
if tr.accelerator.is_main_process:
    sd = {k: v.detach().clone() for k, v in tr.accelerator.unwrap_model(tr.model).state_dict().items()}
    sd.update({f"component.{k}": v.detach().clone() for c in comps for k, v in c.state_dict().items()})
    torch.save(dict(n=tr.accelerator.num_processes, loss=[r["loss"] for r in tr.history], state=sd,
                    wrapped=[type(m).__name__ for m in tr.component_modules]), out)
tr.accelerator.wait_for_everyone()    # every rank is done, and rank 0 has written its result
if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
import os; sys.stdout.flush(); sys.stderr.flush()
os._exit(0)   # torch's CPU (gloo) teardown at interpreter exit intermittently aborts a rank ("terminate called without an
              # active exception", SIGABRT) after all work is done; the result is on disk, so skip the interpreter's teardown
''' % TEXT


DDP_ENV = dict(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def run_script(tmp_path, launcher: list, name: str, bs: int, *args) -> dict:
    "Run DDP_SCRIPT (per-process batch `bs`) under `launcher` (argv before the script: python, torchrun, accelerate); its result."
    script = tmp_path / "ddp.py"
    if not script.exists(): script.write_text(DDP_SCRIPT)
    r = subprocess.run([*launcher, str(script), str(tmp_path / name), str(bs), *args], env=dict(os.environ, **DDP_ENV),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(launcher) or 'python'} failed:\n{r.stderr[-4000:]}"
    return torch.load(tmp_path / name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    "The script as one process with the whole batch: what two processes must equal."
    return run_script(tmp_path_factory.mktemp("one"), [sys.executable], "one.pt", 4)


def assert_two_equal_one(one, two):
    assert (one["n"], two["n"]) == (1, 2)                             # really two processes (and one)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)       # each process's share, summed: the global loss
    assert max_diff(one["state"], two["state"]) < 1e-5


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tmp_path, one_process):
    two = run_script(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], "two.pt", 2)
    assert_two_equal_one(one_process, two)


@pytest.mark.slow
def test_ddp_accelerate_launch_two_processes_equal_one(tmp_path, one_process):
    # accelerate 1.16 on CPUs: `--cpu --num_processes 2` starts ONE process unless an MPI hostfile is given (its CPU launcher
    # is mpirun); `--multi_gpu` is its torchrun launcher, and the script's TrainingArguments(use_cpu=True) makes each process
    # a CPU one (gloo). Every setting is given, so no accelerate config file is read for them; port 0: a free one.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    two = run_script(tmp_path, launch, "two.pt", 2)
    assert_two_equal_one(one_process, two)


@pytest.mark.slow
def test_ddp_trainable_components_two_processes_equal_one(tmp_path):
    # Labels unmasked: a component's loss is its micro-batch mean weighted by the micro-batch's share of the targets (the
    # Distiller's rule), which splits exactly over processes when every sequence has as many targets as positions count.
    one = run_script(tmp_path, [sys.executable], "one.pt", 2, "feat")
    two = run_script(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"], "two.pt", 1, "feat")
    assert (one["wrapped"], two["wrapped"]) == (["FeatureAlignment"], ["DistributedDataParallel"])   # as the Distiller prepares them
    assert_two_equal_one(one, two)                 # the projections too: their gradients are all-reduced
