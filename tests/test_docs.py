"""The documentation: the site builds with --strict (offline), its examples run, and it covers
every mechanism and layer.

The build runs ``mkdocs build --strict`` as ``make docs`` does, into a temporary folder: a broken
page, link, nav entry or docstring reference fails it. The ``dev`` extra installs the docs tools,
so in CI (``make test``) the build always runs; without them it is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attnkit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _missing_doc_tools() -> list[str]:
    missing = []
    for name in DOC_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _example_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "api" not in p.relative_to(DOCS).parts)]


def test_site_builds_strict_offline(tmp_path):
    missing = _missing_doc_tools()
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's end-of-life banner, not a build warning
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    elapsed = time.perf_counter() - start
    site = tmp_path / "site"
    # the pages the nav promises, the API reference rendered from docstrings, the results README
    for page in ("index.html", "pitfalls/index.html", "api/ops/index.html", "benchmarks/results/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "ops" / "index.html").read_text()
    assert 'id="attnkit.attend"' in api and "Exact softmax attention" in api
    # the hook renders :class:`~attnkit.models.DecoderLM` as DecoderLM, as Sphinx does
    assert "<code>~" not in (site / "api" / "layers" / "index.html").read_text()
    assert elapsed < 120, f"the docs build took {elapsed:.0f} s"


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # transformers 5.25 renames it; 5.17 knows only it
@pytest.mark.parametrize("path", _example_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(path):
    blocks = _python_blocks(path)
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name} example {i + 1}", "exec"), {"__name__": "__docs__"})
        except Exception as err:  # the message names the file and the example
            raise AssertionError(f"{path.relative_to(ROOT)}, python example {i + 1} failed: {err!r}\n{block}") from err


def test_every_mechanism_has_a_page_and_every_layer_an_api_entry():
    pages = {p.stem: p.read_text() for p in (DOCS / "mechanisms").glob("*.md")}
    for card in attnkit.mechanisms():
        assert card.family in pages, f"family {card.family!r} of {card.name!r} has no docs/mechanisms/{card.family}.md"
        assert f"`{card.name}`" in pages[card.family], f"{card.name!r} is not on docs/mechanisms/{card.family}.md"
        if card.arxiv:
            assert card.arxiv in pages[card.family], f"{card.name!r}'s paper (arXiv {card.arxiv}) is not cited"
    from attnkit import layers

    api = (DOCS / "api" / "layers.md").read_text()
    for name in layers.__all__:
        assert f"::: attnkit.layers.{name}\n" in api, f"attnkit.layers.{name} is not in docs/api/layers.md"


def test_readme_keeps_the_quickstart_and_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert "make bench" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^bench:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "docs/index.md" in readme and "benchmarks/results/README.md" in readme
    for card in attnkit.mechanisms():
        assert f"`{card.name}`" in readme, f"{card.name!r} is missing from the README's mechanism table"
    # the README is outside the site, so the strict build does not check its links: check them here
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", readme):
        if "://" not in target:
            assert (ROOT / target).exists(), f"the README links {target}, which does not exist"


def test_cited_result_files_exist_under_their_current_names():
    # benchmarks/results/ was reorganised by device (h200/, cpu/) and superseded files were removed:
    # a page or docstring citing a result file names it as h200/NAME or cpu/NAME (a glob such as
    # cpu/compare-*-heads.json must match at least one file), and an old flat name (h200-....json)
    # only as history, followed by "in git at <commit>"
    results = ROOT / "benchmarks" / "results"
    sources = [p for p in DOCS.rglob("*.md")] + [ROOT / "README.md", results / "findings.md"]
    sources += [p for p in (ROOT / "src" / "attnkit").rglob("*.py")]
    ext = r"\.(?:json|jsonl|png|log|txt)\b"
    current = re.compile(r"(?<![\w.-])((?:h200|cpu)/[\w.*-]+" + ext + ")")
    old = re.compile(r"(?<![\w-])((?:h200|cpu)-[\w.*-]+" + ext + ")")
    missing, stale = [], []
    for path in sources:
        text = path.read_text()
        where = path.relative_to(ROOT)
        for m in current.finditer(text):
            if not any(results.glob(m.group(1))):
                missing.append(f"{where}: {m.group(1)}")
        for m in old.finditer(text):
            if not re.match(r"[`'\"\s(#,]*in git at [0-9a-f]{7,40}", text[m.end():]):
                stale.append(f"{where}: {m.group(1)}")
    assert sources and not missing, f"cited result files missing from benchmarks/results/: {missing}"
    assert not stale, f"old result names (cite h200/... or cpu/..., or '`OLD` (in git at COMMIT)'): {stale}"
