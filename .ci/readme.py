"""Write README.md from nbs/index.ipynb (what `nbdev-readme` does through Quarto, which cannot be installed here).

Markdown cells are copied, `#| hide` cells dropped, directive lines stripped, code cells fenced with their
text/markdown outputs. Image links relative to nbs/ are rewritten relative to the repository root.
`python .ci/readme.py --check` exits 1 when README.md is not what index.ipynb gives.
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def _src(cell): return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
def _txt(x): return ''.join(x) if isinstance(x, list) else x

def _directives(src):
    return {l[3:].strip().split(':')[0].strip() for l in src.splitlines() if l.startswith('#|')}

def _fix_links(md): return re.sub(r'\]\((?!https?:|/|#|mailto:)([^)\s]+)\)', r'](nbs/\1)', md)

def _outputs(cell):
    res = []
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream': res.append(('text', _txt(o['text'])))
        elif o['output_type'] in ('execute_result', 'display_data'):
            d = o['data']
            if 'text/markdown' in d: res.append(('md', _txt(d['text/markdown'])))
            elif 'text/plain' in d and not any(k.startswith('image/') for k in d): res.append(('text', _txt(d['text/plain'])))
    return res

def render(nb_path=root/'nbs'/'index.ipynb'):
    nb, parts = json.loads(Path(nb_path).read_text()), []
    for cell in nb['cells']:
        src = _src(cell)
        dirs = _directives(src)
        if {'hide', 'exporti'} & dirs: continue
        body = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        if cell['cell_type'] == 'markdown':
            parts.append(_fix_links(body))
            continue
        if 'echo' not in {d for d in dirs} or 'echo: true' in src:
            if body and not re.search(r'^#\|\s*echo:\s*false', src, re.M): parts.append(f'```python\n{body}\n```')
        for kind, out in _outputs(cell):
            out = out.rstrip('\n')
            parts.append(_fix_links(out) if kind == 'md' else f'```\n{out}\n```')
    return '\n\n'.join(p for p in parts if p) + '\n'

if __name__ == '__main__':
    txt, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != txt:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`')
        print('README.md matches nbs/index.ipynb')
    else:
        readme.write_text(txt)
        print(f'wrote {readme}')
