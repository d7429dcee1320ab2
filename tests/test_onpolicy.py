"""On-policy distillation (kdlit.onpolicy) on tiny pairs: λ = 0 is off-policy, masking and num_items, batched generation,
seeds, resume, the guard, chat prompts, bad values."""
import copy, json, math, subprocess, sys

import pytest
import torch

from kdlit.data import make_loaders
from kdlit.distiller import Callback, CheckpointCB, Distiller, ProgressCB, count_tokens, find_checkpoint
from kdlit.models import tiny_pair
from kdlit.onpolicy import (DATA_ROWS, OnPolicyConfig, OnPolicyKD, OnPolicyStream, read_prompts, render_prompts,
                            sample_continuations)

TEXT = ["Knowledge distillation trains a small student to match the softened output distribution of a large "
        "teacher. The temperature flattens both distributions; the T squared factor keeps gradient scales. " * 20]
CUR = dict(kd=1.0, lm=0.5)
GEN = dict(max_new_tokens=8, prompt_len=8)
CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def distiller(src=None, *, seed=0, cbs=(), pair_kw=None, chat_template=None, **kw):
    torch.manual_seed(seed)
    t, s, tok = tiny_pair(seed=seed, **(pair_kw or {}))
    tok.chat_template = chat_template
    dls = make_loaders(tok, TEXT, block_size=32, batch_size=4, n_valid=2, seed=seed)
    cbs = [ProgressCB(bar=False), *cbs]
    extra = dict(loss=src, cbs=[src, *cbs]) if src is not None else dict(fused=False, cbs=cbs)
    kw = dict(dict(curriculum=CUR, lr=3e-3, precision="no", verbose=False), **kw)
    return Distiller(t, s, dls, **extra, **kw)


def params(d): return {k: v.detach().clone() for k, v in d.accelerator.unwrap_model(d.student).state_dict().items()}
def max_diff(a, b): return max(float((a[k] - b[k]).abs().max()) for k in a)


class At(Callback):
    order = 100
    def __init__(self, event, steps, fn): self.steps, self.fn = set(steps), fn; setattr(self, event, self._call)
    def _call(self, learn):
        if learn.step in self.steps: self.fn(learn)


class Batches(Callback):
    "Records every micro-batch the step drew (after the stream), and the step's num_items."
    order = 95
    def __init__(self): self.seen = []
    def after_loss(self, learn): self.seen.append(learn.n_items)


# ---------------------------------------------------------------- λ = 0 is the off-policy distiller
@pytest.mark.parametrize("accum", [1, 2])
def test_lambda0_reproduces_off_policy(accum):
    off = distiller(grad_accum=accum).fit(5)
    src = OnPolicyKD(lmbda=0.0, **GEN)
    on = distiller(src, grad_accum=accum).fit(5)
    for a, b in zip(off.history, on.history):
        for k in ("loss", "kd", "lm", "grad_norm", "tokens"): assert a[k] == b[k], (a["step"], k)
    assert max_diff(params(off), params(on)) == 0
    assert [r["origin"] for r in src.gen_log] == ["data"] * 5 * accum


# ---------------------------------------------------------------- λ = 1: masks, num_items, lm off
def test_lambda1_prompt_positions_carry_no_gradient_and_only_continuations_count():
    src = OnPolicyKD(lmbda=1.0, **GEN)
    d = distiller(src, divergence="reverse_kl")
    d.fit(2)                                                       # the stream is live; now one micro-batch by hand
    d.T, d.weights = 1.0, d.curriculum(0.0)
    b = d.stream.next()
    assert b[DATA_ROWS].tolist() == [False] * 4
    n = count_tokens([b])
    cont = b["labels"] != -100
    assert n == int(cont.sum()) and 4 <= n <= 4 * GEN["max_new_tokens"]
    assert not cont[:, :GEN["prompt_len"]].any()                   # prompt positions are never targets
    grab = {}
    h = d.accelerator.unwrap_model(d.student).lm_head.register_forward_hook(lambda m, i, o: grab.setdefault("z", o).retain_grad())
    loss, logs = src(d, b, n)
    h.remove()
    loss.backward()
    g = grab["z"].grad.abs().sum(-1)                               # [B, S]: gradient reaching each position's logits
    predicts_cont = torch.zeros_like(cont); predicts_cont[:, :-1] = cont[:, 1:]
    assert (g[~predicts_cont] == 0).all()                          # prompt (and padding) positions: no gradient
    assert (g[predicts_cont] > 0).all()
    assert float(logs["lm"]) == 0.0 and float(logs["kd"]) > 0     # the lm term only on data tokens
    assert [r["tokens"] for r in d.history] == [r["new_tokens"] for r in src.gen_log[:2]]


def test_lm_term_counts_only_data_rows():
    src = OnPolicyKD(lmbda=1.0, **GEN)
    d = distiller(src); d.fit(1)
    d.T, d.weights = 1.0, d.curriculum(0.0)
    b = dict(d.stream.inner.next())                                # a data micro-batch, marked half data, half generated
    b[DATA_ROWS] = torch.tensor([True, True, False, False])
    n = count_tokens([b])
    _, logs = src(d, b, n)
    from kdlit.losses import lm_loss
    from kdlit.distiller import shift_labels
    with torch.no_grad():
        z = d.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        y = shift_labels(b["labels"], b["attention_mask"]); y[2:] = -100
        assert float(logs["lm"]) == pytest.approx(float(lm_loss(z, y, num_items=n)), rel=1e-6)


# ---------------------------------------------------------------- generation
def test_left_padded_batched_generation_equals_one_by_one():
    _, st, tok = tiny_pair(seed=1, initializer_range=0.3)
    eos = tok.eos_token_id
    ps = [torch.tensor(tok(x)["input_ids"]) for x in ("def f(x):", "a", "hello, world", "xy")]
    kw = dict(max_new_tokens=10, temperature=0.0, eos_ids=[eos], pad_id=tok.pad_token_id)
    batched = sample_continuations(st, ps, **kw)
    for i, p in enumerate(ps):
        one = sample_continuations(st, [p], **kw)
        n = int(one["attention_mask"].sum())
        assert int(batched["attention_mask"][i].sum()) == n
        assert torch.equal(batched["input_ids"][i, :n], one["input_ids"][0, :n])
        assert torch.equal(batched["labels"][i, :n], one["labels"][0, :n])
    assert st.training                                             # mode restored


def test_eos_ends_a_continuation():
    _, st, tok = tiny_pair(seed=1, initializer_range=0.3)
    ps = [torch.tensor(tok(x)["input_ids"]) for x in ("def f(x):", "a")]
    free = sample_continuations(st, ps, max_new_tokens=10, temperature=0.0, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    stop = int(free["input_ids"][0, len(ps[0]) + 2])              # pretend the 3rd generated token of row 0 is an EOS
    b = sample_continuations(st, ps, max_new_tokens=10, temperature=0.0, eos_ids=[tok.eos_token_id, stop], pad_id=tok.pad_token_id)
    row = b["input_ids"][0]
    first = next(j for j in range(len(ps[0]), len(row)) if int(row[j]) == stop)
    assert int(b["attention_mask"][0].sum()) == first + 1          # EOS kept as the last target, nothing after it
    assert (b["labels"][0, first + 1:] == -100).all() and int(b["labels"][0, first]) == stop


def test_seed_reproduces_samples_and_leaves_global_rng():
    _, st, tok = tiny_pair(seed=1, initializer_range=0.3)
    ps = [torch.tensor(tok(x)["input_ids"]) for x in ("def f(x):", "a")]
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    state = torch.get_rng_state()
    a, b, c = (sample_continuations(st, ps, seed=s, **kw)["input_ids"] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    runs = []
    for seed in (0, 0, 1):
        src = OnPolicyKD(lmbda=1.0, seed=seed, **GEN)
        rec = []
        d = distiller(src, cbs=[At("after_loss", range(4), lambda l: rec.append(l.loss.item()))]).fit(4)
        runs.append((rec, [r["new_tokens"] for r in src.gen_log]))
    assert runs[0] == runs[1] and runs[0][0] != runs[2][0]


# ---------------------------------------------------------------- resume, guard
def _run(steps, ckpt=None, resume=None, stop_at=None, **gen):
    stop = At("after_step", [stop_at] if stop_at else [], lambda l: (_ for _ in ()).throw(KeyboardInterrupt()))
    src = OnPolicyKD(**{**GEN, **gen})
    d = distiller(src, cbs=[stop, *([CheckpointCB(ckpt, every=4)] if ckpt else [])], grad_accum=2)
    try: d.fit(steps, resume=resume)
    except KeyboardInterrupt: pass
    return d, src


def test_resume_is_exact(tmp_path):
    full, fs = _run(10, lmbda=0.5, seed=2)
    part, _ = _run(10, ckpt=tmp_path, stop_at=6, lmbda=0.5, seed=2)
    assert find_checkpoint(tmp_path).name == "step-0000004"
    cont, cs = _run(10, ckpt=tmp_path, resume=tmp_path, lmbda=0.5, seed=2)
    assert len(cont.history) == 10
    for a, b in zip(full.history, cont.history):
        for k in ("loss", "kd", "lm", "grad_norm", "tokens"): assert abs(a[k] - b[k]) <= 1e-6, (a["step"], k)
    assert max_diff(params(full), params(cont)) <= 1e-6
    assert [r["origin"] for r in fs.gen_log][8:] == [r["origin"] for r in cs.gen_log]   # the 12 after step 4
    assert {"student", "data"} == {r["origin"] for r in fs.gen_log}


def test_resume_of_an_off_policy_checkpoint_is_refused(tmp_path):
    distiller(cbs=[CheckpointCB(tmp_path)]).fit(2)
    with pytest.raises(ValueError, match="without on-policy batches"): distiller(OnPolicyKD(**GEN)).fit(3, resume=tmp_path)


def test_guard_skips_a_non_finite_loss_in_a_generated_batch():
    def nan_teacher(learn):
        learn._h = learn.teacher.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
    def unhook(learn): learn._h.remove()
    before = {}
    snap = At("before_step", [2], lambda l: before.setdefault("p", params(l)))
    after = {}
    snap2 = At("after_step", [3], lambda l: after.setdefault("p", params(l)))
    src = OnPolicyKD(lmbda=1.0, **GEN)
    d = distiller(src, cbs=[At("before_step", [2], nan_teacher), At("after_step", [3], unhook), snap, snap2]).fit(5)
    assert [r["skipped"] for r in d.history] == [0, 0, 1, 0, 0]
    assert max_diff(before["p"], after["p"]) == 0                 # the step with the generated NaN batch moved nothing
    assert d.guard.n_skipped == 1 and all(math.isfinite(r["loss"]) for i, r in enumerate(d.history) if i != 2)


# ---------------------------------------------------------------- seq-KD and chat prompts
def test_seq_kd_uses_the_teachers_samples():
    src = OnPolicyKD(lmbda=0.0, seq_kd=True, **GEN)
    d = distiller(src).fit(3)
    assert [r["origin"] for r in src.gen_log] == ["teacher"] * 3
    assert all(r["lm"] == 0 for r in d.history) and [r["tokens"] for r in d.history] == [r["new_tokens"] for r in src.gen_log]




def test_chat_prompts_are_rendered_and_cycled(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join('{"prompt": "question %d?"}' % i for i in range(6)))
    src = OnPolicyKD(lmbda=1.0, prompts=f, max_new_tokens=4)
    d = distiller(src, chat_template=CHAT)
    seen = [d.tokenizer.decode(p) for k in range(3) for p in src.prompts_for(dict(input_ids=torch.zeros(4, 2, dtype=torch.long)), k)]
    assert sorted(seen[:6]) == sorted(f"<user>question {i}?\n<assistant>" for i in range(6))   # one pass visits each once
    assert seen[6:12] != seen[:6] and sorted(seen[6:12]) == sorted(seen[:6])  # the next pass, reshuffled
    d.fit(2)
    assert all(r["origin"] == "student" for r in src.gen_log)


def test_chat_prompts_from_a_dataset_column():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(dict(q=["a?", "b?"], other=[1, 2]))
    assert read_prompts(ds, column="q") == ["a?", "b?"]
    tok = tiny_pair().tokenizer
    with pytest.raises(ValueError, match="no chat template"): render_prompts(["a?"], tok)
    tok.chat_template = CHAT
    assert tok.decode(render_prompts(["a?"], tok)[0]) == "<user>a?\n<assistant>"


# ---------------------------------------------------------------- bad values: one clear error, no model needed
@pytest.mark.parametrize("kw, msg", [
    (dict(lmbda=1.01), r"lmbda: expected a number in \[0, 1\], got 1.01"),
    (dict(lmbda=-0.5), r"lmbda: expected a number in \[0, 1\], got -0.5"),
    (dict(lmbda=float("nan")), "lmbda"),
    (dict(max_new_tokens=0), "max_new_tokens: expected an int >= 1, got 0"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(gen_temperature=-1.0), "gen_temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(prompt_len=0), "prompt_len"),
    (dict(seq_kd=1), "seq_kd"), (dict(seed=-1), "seed")])
def test_bad_values_are_one_clear_error(kw, msg):
    with pytest.raises(ValueError, match=msg): OnPolicyConfig(**kw)


def test_bad_prompts_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"): OnPolicyConfig(prompts=tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="prompts: no such file"): OnPolicyConfig(prompts=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="prompts: cannot read"): OnPolicyConfig(prompts=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not both"): OnPolicyKD(OnPolicyConfig(), lmbda=0.5)


def test_bad_setups_fail_at_construction():
    with pytest.raises(ValueError, match="kd weight is 0"): distiller(OnPolicyKD(), curriculum=dict(kd=0.0, lm=1.0))
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        distiller(OnPolicyKD(prompt_len=32, max_new_tokens=40), pair_kw=dict(max_position_embeddings=64))


def test_side_by_side_report_rows():
    from kdlit.onpolicy import side_by_side
    t, s, tok = tiny_pair(seed=1, initializer_range=0.3)
    ps = [torch.tensor(tok(x)["input_ids"]) for x in ("def f(x):", "a")]
    rows = side_by_side({"teacher": t, "student": s}, ps, tok, max_new_tokens=6)
    assert [r["prompt"] for r in rows] == ["def f(x):", "a"]
    ref = sample_continuations(s, ps, max_new_tokens=6, temperature=0.0, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    for r, ids, lab in zip(rows, ref["input_ids"], ref["labels"]):
        assert r["student"] == tok.decode(ids[lab != -100], skip_special_tokens=True)
    with pytest.raises(ValueError, match="prompts: expected at least one prompt"): side_by_side({"s": s}, [], tok)


# ---------------------------------------------------------------- the CLI: --prompt-len, resume through its checkpoint
from test_cli import ENV, _one_line_failure, assets, history, kdlit, tiny_args   # noqa: E402,F401  (assets: the tiny saved teacher)

STOP_AT = '''
import sys
from kdlit.cli import distill
from kdlit.distiller import CancelFitException
class Stop:
    order = 100
    def after_step(self, learn):
        if learn.step == int(sys.argv[1]): raise CancelFitException()
distill(sys.argv[2], cbs=[Stop()])
'''


def _student(run):
    from safetensors.torch import load_file
    return load_file(next((run / "student").glob("*.safetensors")))


@pytest.mark.parametrize("case", ["zero", "not_an_int", "whole_block", "without_on_policy", "with_chat_prompts"])
def test_bad_prompt_len_is_one_line_before_loading(case, assets, tmp_path):
    (tmp_path / "p.txt").write_text("What is a list?\n")
    args = dict(zero=["--on-policy", 0.5, "--prompt-len", 0], not_an_int=["--on-policy", 0.5, "--prompt-len", "x"],
                whole_block=["--on-policy", 0.5, "--prompt-len", 32], without_on_policy=["--prompt-len", 8],
                with_chat_prompts=["--on-policy", 0.5, "--prompt-len", 8, "--prompts", tmp_path / "p.txt"])[case]
    line = _one_line_failure(kdlit(*tiny_args(assets, tmp_path / "o", 2, *args)), tmp_path / "o")   # seq_len 32
    want = dict(zero="prompt_len: expected an int >= 1, got 0", not_an_int="--prompt-len: invalid int value: 'x'", whole_block="fewer than seq_len (32)",
                without_on_policy="prompt_len: used only by on-policy KD; add --on-policy", with_chat_prompts="prompt_len: ")[case]
    assert want in line and line.startswith("kdlit distill: error:"), line


def test_on_policy_cli_resume_equals_the_uninterrupted_run(assets, tmp_path):
    "--on-policy 0.5 stopped after step 6 and resumed (from the step-4 checkpoint) = the uninterrupted 8 steps: the generation RNG restores."
    op = ("--on-policy", 0.5, "--max-new-tokens", 8, "--prompt-len", 8)     # seed 0: both kinds of batch after step 4
    full, part = tmp_path / "full", tmp_path / "part"
    r = kdlit(*tiny_args(assets, full, 8, *op))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["prompt_len"] == 8 and json.loads((full / "summary.json").read_text())["on_policy"]["prompt_len"] == 8
    (tmp_path / "part.json").write_text(json.dumps(dict(cfg, out=str(part))))
    r = subprocess.run([sys.executable, "-c", STOP_AT, "6", str(tmp_path / "part.json")], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads((part / "summary.json").read_text())["steps_done"] == 6
    assert (part / "checkpoint/latest").read_text().strip().endswith("4")
    r = kdlit("distill", "--out", part, "--resume")                       # its config.json: 8 steps, --prompt-len 8
    assert r.returncode == 0, r.stderr
    assert json.loads((part / "config.json").read_text())["prompt_len"] == 8
    a, b = history(full), history(part)
    assert [x["step"] for x in b] == list(range(9))
    toks = [x["tokens"] for x in a[5:]]
    assert any(t <= 4 * 8 for t in toks) and any(t == 4 * 31 for t in toks), toks   # sampled and corpus batches after the checkpoint
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], x["step"]
        for k in ("loss", "kd", "lm", "val_lm"):
            if k in x and isinstance(x[k], float) and math.isfinite(x[k]): assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
    sa, sb = _student(full), _student(part)
    assert sa.keys() == sb.keys() and max(float((sa[k] - sb[k]).abs().max()) for k in sa) <= 1e-5
    fa, fb = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert fb["finished"] is True and fb["after_loss"] == pytest.approx(fa["after_loss"], rel=1e-5)
