"""The import rules of docs/architecture.md: every module's attnkit imports, module-level and inside
functions, stay within what its package may import."""

import ast
from pathlib import Path

import attnkit

PACKAGE = Path(attnkit.__file__).resolve().parent
BASE = {"_checks", "_meta", "_console", "__version__"}
LOW = BASE | {"patterns", "rope", "state"}
CORE = LOW | {"ops", "cards"}
LAYERS = CORE | {"layers"}  # never registry: the registry lists the layers' cards, not the reverse
REGISTRY = LAYERS | {"registry"}
MODELS = REGISTRY | {"models", "tasks"}
METHODS = MODELS  # hf, diffusion, distributed: never each other
TOOLS = METHODS | {"hf", "diffusion", "distributed"}

ALLOWED = {
    "_checks": BASE, "_meta": BASE, "_console": BASE,
    "patterns": BASE | {"patterns"},
    "rope": LOW, "state": LOW,
    "ops": LOW | {"ops"},
    "cards": BASE | {"patterns"},
    "layers": LAYERS,
    "registry": REGISTRY,
    "models": MODELS,
    "tasks": BASE | {"tasks"},
    "hf": METHODS | {"hf"}, "diffusion": METHODS | {"diffusion"}, "distributed": METHODS | {"distributed"},
    "analysis": TOOLS | {"analysis"}, "bench": TOOLS | {"bench"}, "compare": TOOLS | {"compare"},
    "eval": TOOLS | {"eval"},
    "cli": None,  # the command imports everything
    "__init__": LOW | {"ops", "cards", "registry", "layers", "models"},
}
ALLOWED["vision"] = METHODS | {"vision"}  # issue 28: modules over image patch tokens, level 5
ALLOWED["pooling"] = METHODS  # issue 28: pooling heads over a frozen LM's hidden states, level 5
ALLOWED["multimodal"] = METHODS | {"multimodal"}  # issue 28: fusion blocks over two modalities' tokens, level 5
ALLOWED["routing"] = METHODS | {"routing"}  # issue 28: sparse MoE layers with token routers (graph-of-tokens SMoE), level 5
# (module, imported package): each a documented exception (docs/architecture.md)
EXCEPTIONS = {("layers/attention_experts.py", "models")}


def _imports(path: Path) -> set[str]:
    """The top-level attnkit packages ``path`` imports (relative or absolute imports)."""
    rel = path.relative_to(PACKAGE)
    parts = list(rel.with_suffix("").parts)
    if rel.name == "__init__.py":
        parts = parts[:-1] + ["__init__"]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = parts[:-node.level]
            target = base + (node.module.split(".") if node.module else [])
            out |= {target[0]} if target else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attnkit":
            names = node.module.split(".")
            out |= {names[1]} if len(names) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("attnkit.")}
    return out


def test_every_package_imports_only_what_architecture_allows():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        package = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert package in ALLOWED, f"{rel}: package {package!r} is not in docs/architecture.md's table"
        allowed = ALLOWED[package]
        if allowed is None:
            continue
        for imported in _imports(path) - allowed - {package}:
            if (rel.as_posix(), imported) not in EXCEPTIONS:
                problems.append(f"{rel} imports attnkit.{imported}")
    assert not problems, "imports that cross docs/architecture.md's rules:\n" + "\n".join(problems)


def test_the_reader_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    """The check itself can fail: a layer importing bench, relatively or absolutely, is caught."""
    fake = tmp_path / "attnkit"
    (fake / "layers").mkdir(parents=True)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    bad = fake / "layers" / "bad.py"
    bad.write_text("from ..bench import harness\ndef f():\n    import attnkit.compare\n")
    assert _imports(bad) == {"bench", "compare"}


# ops by family (docs/architecture.md, level 2): each family a package with its reference beside its
# kernels; a family imports no other family but softmax (sigmoid's FlexAttention path runs on attend)
OPS_FAMILIES = {"softmax": set(), "sigmoid": {"softmax"}, "linear": set(), "select": set()}


def _ops_families(path: Path) -> set[str]:
    """The ``attnkit.ops`` families that ``path`` (a module of ``ops/<family>/``) imports."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            target = parts[:-node.level] + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnkit."):
            target = node.module.split(".")[1:]
        else:
            continue
        if target[:1] == ["ops"]:
            out |= {target[1]} if len(target) > 1 else {a.name for a in node.names}
    return out


def test_ops_families_import_only_softmax():
    problems = []
    for path in sorted((PACKAGE / "ops").rglob("*.py")):
        rel = path.relative_to(PACKAGE / "ops")
        if len(rel.parts) == 1:
            assert rel.name == "__init__.py", f"ops/{rel}: an op belongs in its family's package (ops/<family>/)"
            continue
        family = rel.parts[0]
        assert family in OPS_FAMILIES, f"ops/{family} is not a family of docs/architecture.md"
        for imported in _ops_families(path) - OPS_FAMILIES[family] - {family}:
            problems.append(f"ops/{rel.as_posix()} imports attnkit.ops.{imported}")
    assert not problems, "ops families crossing docs/architecture.md's rule:\n" + "\n".join(problems)


def test_the_ops_reader_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    fake = tmp_path / "attnkit"
    (fake / "ops" / "linear").mkdir(parents=True)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    bad = fake / "ops" / "linear" / "bad.py"
    bad.write_text("from ..softmax.flex import block_mask_for\nfrom .. import sigmoid\n"
                   "from .lightning import x\ndef f():\n    from attnkit.ops.select import prefix_quantile\n")
    assert _ops_families(bad) == {"softmax", "sigmoid", "linear", "select"}


def test_layers_never_import_the_registry():
    """Registration is explicit: a layer module defines its cards as data and imports the
    ``Card`` type from ``attnkit.cards``; only the registry imports the layers."""
    offenders = [path.relative_to(PACKAGE).as_posix() for path in sorted((PACKAGE / "layers").rglob("*.py"))
                 if "registry" in _imports(path)]
    assert not offenders, f"layer modules importing attnkit.registry: {offenders}"
    assert "layers" in _imports(PACKAGE / "registry.py")
    assert "registry" not in _imports(PACKAGE / "cards.py")


def test_no_module_imports_the_command():
    """``attnkit.cli`` imports the subcommands; none of them (nor anything else) imports it back:
    their shared console and output helpers live in ``attnkit._console``."""
    offenders = [path.relative_to(PACKAGE).as_posix() for path in sorted(PACKAGE.rglob("*.py"))
                 if path.name != "cli.py" or path.parent != PACKAGE
                 if "cli" in _imports(path)]
    assert not offenders, f"modules importing attnkit.cli: {offenders}"
