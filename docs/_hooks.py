"""mkdocs hooks for attnkit's site.

- The files under ``benchmarks/`` join the site at their repository paths. The results README
  (``benchmarks/results/README.md``) is generated from the committed JSON by its own script; the
  site includes it as it is, with the plots and JSON it links to, rather than keeping a copy in
  ``docs/`` that would go stale.
- A link in those pages to a repository file that is not part of the site (``../../src/...``)
  becomes the file's path in code; a link to a file that exists nowhere stays a link, so the strict
  build still reports it.
- Docstrings cross-reference in Sphinx's roles, which Markdown renders as the role's name beside
  a code span; the role's name is dropped, and a ``~`` path shows its last name only (as Sphinx
  does: ``:class:`~attnkit.models.DecoderLM``` reads ``DecoderLM``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

_INCLUDED = "benchmarks"
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")
_ROLES = r":(?:class|func|meth|mod|attr|data|obj):\s*"
_ROLE = re.compile(_ROLES + r"(?=<code>)")
_SHORT_ROLE = re.compile(_ROLES + r"<code>~(?:\w+\.)*(\w+)</code>")


def _root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files, config):
    root = _root(config)
    for path in sorted((root / _INCLUDED).rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        files.append(File(path.relative_to(root).as_posix(), str(root), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    if not page.file.src_uri.startswith(_INCLUDED + "/"):
        return markdown
    root = _root(config)
    here = posixpath.dirname(page.file.src_uri)

    def outside_the_site(match):
        text, target = match.group(1), match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        resolved = posixpath.normpath(posixpath.join(here, target))
        if files.get_file_from_path(resolved) is None and (root / resolved).exists():
            return f"{text} (`{resolved}`)"
        return match.group(0)

    return _LINK.sub(outside_the_site, markdown)


def on_page_content(html, page, config, files):
    return _ROLE.sub("", _SHORT_ROLE.sub(r"<code>\1</code>", html))
