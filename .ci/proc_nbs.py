"""What `nbdev-proc-nbs` does, minus its Quarto download (Quarto cannot be installed offline here).

Refreshes nbs/nbdev.yml from pyproject.toml, rebuilds the module index and processes every notebook into
_proc/ exactly as `nbdev-docs` would before handing them to Quarto. Fails on any notebook that does not process.
"""
import os
from nbdev.config import get_config
from nbdev.quarto import refresh_quarto_yml
from nbdev.serve import proc_nbs
import nbdev.doclinks

cfg = get_config()
os.chdir(cfg.config_path)
refresh_quarto_yml()
nbdev.doclinks._build_modidx()
cache = proc_nbs(cfg.nbs_path, n_workers=0)
done = sorted(p.relative_to(cache) for p in cache.rglob('*') if p.suffix in ('.ipynb', '.qmd', '.yml', '.md'))
print(f"processed {len(done)} files into {cache}")
