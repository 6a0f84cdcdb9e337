#!/usr/bin/env bash
# Release check: build the sdist and the wheel, install the wheel into a fresh virtual environment
# with the core dependencies only, import it there, run the README's usage example and `pip check`.
#
#   .ci/release_check.sh              # leaves the built files in dist/
#   PYTHON=python3.11 .ci/release_check.sh
#
# Needs nothing but a package registry: the build backend, torch and the core dependencies come
# from there. torch is the pinned CPU-runnable release, installed before the wheel so that the
# wheel's own requirement (torch>=2.1) never pulls another build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.14.1"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n== %s\n' "$*"; }

VERSION="$("$PYTHON" - <<'EOF'
import re
text = open("ddfp_lib/__init__.py").read()
print(re.search(r'^__version__ = "([^"]+)"$', text, flags=re.M).group(1))
EOF
)"
step "ddfp-lib $VERSION: CHANGELOG.md and CITATION.cff agree"
grep -Eq "^## \[$VERSION\] - [0-9]{4}-[0-9]{2}-[0-9]{2}$" CHANGELOG.md \
    || { echo "CHANGELOG.md has no '## [$VERSION] - YYYY-MM-DD' section"; exit 1; }
grep -Eq "^version: \"?$VERSION\"?$" CITATION.cff \
    || { echo "CITATION.cff does not say version $VERSION"; exit 1; }

step "build the sdist, then the wheel from it"
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/python" -m pip install --quiet --upgrade pip build
rm -rf dist
"$WORK/build-env/bin/python" -m build --outdir dist . > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; exit 1; }
WHEEL="dist/ddfp_lib-$VERSION-py3-none-any.whl"
SDIST="dist/ddfp_lib-$VERSION.tar.gz"
ls -l "$WHEEL" "$SDIST"

step "wheel and sdist contents"
"$PYTHON" - "$WHEEL" "$SDIST" "$VERSION" <<'EOF'
import sys
import tarfile
import zipfile

wheel, sdist, version = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
required = [
    "ddfp_lib/__init__.py",
    "ddfp_lib/py.typed",
    "ddfp_lib/density.py",
    "ddfp_lib/perturbations/ddfp.py",
    "ddfp_lib/losses/consistency.py",
    "ddfp_lib/adapters/smp.py",
]
missing = [name for name in required if name not in names]
stray = [name for name in names if not name.startswith(("ddfp_lib/", "ddfp_lib-"))]
metadata = zipfile.ZipFile(wheel).read(f"ddfp_lib-{version}.dist-info/METADATA").decode()
members = tarfile.open(sdist).getnames()
root = f"ddfp_lib-{version}"
sdist_missing = [
    name
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "ddfp_lib/py.typed")
    if f"{root}/{name}" not in members
]
problems = []
if missing:
    problems.append(f"wheel lacks {missing}")
if stray:
    problems.append(f"wheel holds files outside the package: {stray[:10]}")
if f"\nVersion: {version}\n" not in metadata:
    problems.append(f"wheel METADATA does not say Version: {version}")
if "Requires-Dist: torch>=2.1" not in metadata:
    problems.append("wheel METADATA does not require torch>=2.1")
if sdist_missing:
    problems.append(f"sdist lacks {sdist_missing}")
if problems:
    sys.exit("\n".join(problems))
print(f"{len(names)} files in the wheel, {len(members)} in the sdist: complete")
EOF

step "fresh environment: $TORCH_PIN, then the wheel and its core dependencies"
"$PYTHON" -m venv "$WORK/env"
ENV_PYTHON="$WORK/env/bin/python"
"$ENV_PYTHON" -m pip install --quiet --upgrade pip
"$ENV_PYTHON" -m pip install --quiet "$TORCH_PIN"
"$ENV_PYTHON" -m pip install --quiet "$WHEEL"

step "import the installed package (from outside the source tree)"
cp README.md "$WORK/README.md"
cd "$WORK"
"$ENV_PYTHON" - "$VERSION" <<'EOF'
import importlib.util
import sys
from pathlib import Path

import ddfp_lib

version = sys.argv[1]
location = Path(ddfp_lib.__file__).resolve()
assert "site-packages" in location.parts, f"imported {location}, not the installed wheel"
assert ddfp_lib.__version__ == version, (ddfp_lib.__version__, version)
assert (location.parent / "py.typed").is_file(), "py.typed is not installed"
extras = ["torchvision", "segmentation_models_pytorch", "skimage", "mlxtend", "FrEIA"]
present = [name for name in extras if importlib.util.find_spec(name) is not None]
assert not present, f"optional dependencies installed by the core install: {present}"
for name in ddfp_lib.__all__:
    getattr(ddfp_lib, name)
print(f"ddfp_lib {ddfp_lib.__version__} from {location.parent}; {len(ddfp_lib.__all__)} names")
EOF

step "the README's usage example (its first python block)"
"$ENV_PYTHON" - <<'EOF'
import re
from pathlib import Path

blocks = re.findall(r"```python\n(.*?)```", Path("README.md").read_text(), flags=re.S)
if not blocks:
    raise SystemExit("README.md has no python block")
Path("readme_example.py").write_text(blocks[0])
EOF
"$ENV_PYTHON" readme_example.py
echo "README example ran"

step "pip check"
"$ENV_PYTHON" -m pip check

step "release check passed: dist/$(basename "$WHEEL") and dist/$(basename "$SDIST")"
