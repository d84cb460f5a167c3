"""mkdocs hook: the files under benchmarks/ join the site at their repository paths.

The results README (``benchmarks/results/README.md``) is generated from the committed JSON by
its own script; the site includes it as it is, with the plots and JSON it links to, rather than
keeping a copy in docs/ that would go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    root = Path(config["config_file_path"]).resolve().parent
    for path in sorted((root / "benchmarks").rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        files.append(File(path.relative_to(root).as_posix(), str(root), config["site_dir"], config["use_directory_urls"]))
    return files


# Docstrings cross-reference in Sphinx's roles (":class:`~attnkit.layers.X`"), which Markdown
# renders as the role's name beside a code span; keep the code span.
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj):\s*(?=<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)
