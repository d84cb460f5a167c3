#!/usr/bin/env bash
# The environment of the kvpress comparison (benchmarks/kvpress/run.py): its own virtual environment,
# because kvpress 0.5.5 pins transformers < 5.3 while attnkit's hf extra needs >= 5.17. kvpress never
# becomes a dependency of attnkit; attnkit enters this environment as source only (a .pth file naming
# this checkout's src/, no install, no dependencies: attnkit's core and attnkit.tasks need no transformers).
# pytest: tests/bench/test_kvpress_script.py runs its kvpress end-to-end test in this environment.
#
#   bash benchmarks/kvpress/setup.sh            # creates .attnkit-cache/kvpress-env (gitignored)
#
# Environment variables:
#   KVPRESS_ENV   where to create it          (default: <repo>/.attnkit-cache/kvpress-env)
#   PYTHON        the interpreter to base it on, >= 3.11 (default: python3)
#   TORCH_SPEC    the torch requirement        (default: torch==2.13.0; a CUDA machine that wants another
#                 build passes e.g. TORCH_SPEC="torch==2.13.0" with its own index: PIP_INDEX_URL=...)
#   FORCE=1       delete an existing environment first
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
env="${KVPRESS_ENV:-$repo/.attnkit-cache/kvpress-env}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
# the versions the comparison was run with; transformers 5.2.0 is the newest that kvpress 0.5.5 accepts (< 5.3)
kvpress_spec="kvpress==0.5.5"
transformers_spec="transformers==5.2.0"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: $python is not Python >= 3.11 (attnkit needs 3.11+); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
if [ -e "$env" ] && [ "${FORCE:-0}" = "1" ]; then
    rm -rf "$env"
fi
if [ ! -x "$env/bin/python" ]; then
    echo "setup.sh: creating $env"
    mkdir -p "$(dirname "$env")"
    "$python" -m venv "$env"
fi
pip=("$env/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip
# torch first and on its own line: kvpress accepts any torch >= 2.3.1, so it must not pick another one
"${pip[@]}" install --quiet "$torch_spec"
"${pip[@]}" install --quiet "$kvpress_spec" "$transformers_spec" "$torch_spec" "rich>=13" "safetensors>=0.4" "matplotlib>=3.7" "pytest>=8"

# attnkit: this checkout's source, without its dependencies (no hf extra: its transformers >= 5.17 would clash)
site="$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$repo/src" > "$site/attnkit-source.pth"

"$env/bin/python" - <<'EOF'
import attnkit, kvpress, torch, transformers
from importlib.metadata import version
print(f"setup.sh: kvpress {version('kvpress')}, transformers {transformers.__version__}, torch {torch.__version__}, "
      f"attnkit from {attnkit.__file__}")
EOF
"${pip[@]}" freeze > "$env/pip-freeze.txt"
echo "setup.sh: pip freeze in $env/pip-freeze.txt (run.py records it into its results too)"
echo "setup.sh: now run  $env/bin/python benchmarks/kvpress/run.py --help"
