"""Notebook hygiene that nbdev itself does not enforce.

nbdev's docs processing (`nbdev-proc-nbs`, `nbdev-docs`) executes every cell that contains an import statement
anywhere, even one flagged `#| slow`. A slow cell with an import would load the real teacher or run a benchmark
while the docs build. This check fails on such cells: keep imports in their own cells.
"""
import sys
from nbdev.config import get_config
from nbdev.process import NBProcessor
from nbdev.processors import _do_eval
from fastcore.xtras import globtastic

bad, skip = [], {'slow', 'gpu', 'notest'}
for fn in globtastic(get_config().nbs_path, file_glob='*.ipynb', skip_folder_re='^[_.]'):
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        flags = skip & set(getattr(cell, 'directives_', {}) or {})
        if flags and _do_eval(cell) and 'export' not in ''.join(cell.directives_):
            bad.append(f'{fn}: cell {cell.idx_} is flagged {sorted(flags)} but contains an import, so the docs build would run it:\n'
                       + '\n'.join('    ' + l for l in cell.source.splitlines()[:6]))
if bad:
    print('\n'.join(bad))
    sys.exit(f'{len(bad)} notebook cell(s) need their imports moved to a separate cell')
print('notebook hygiene ok')
