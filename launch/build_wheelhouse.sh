#!/usr/bin/env bash
# Build an offline wheel set for the Kaggle inference kernel (scored notebooks have no internet).
#
#   launch/build_wheelhouse.sh [OUT_DIR]            # default: dist/wheelhouse
#   DRY_RUN=1 launch/build_wheelhouse.sh            # print the commands, download nothing
#
# Then upload OUT_DIR as a Kaggle dataset (e.g. `kaggle datasets create -p OUT_DIR`, or the web UI) and attach it
# to the notebook; launch/kaggle_kernel.py installs from it with `pip install --no-index --find-links`.
#
# What goes in: the project wheel (arena-pref), its base dependencies from setup.py, bitsandbytes (8-bit/4-bit
# loading) and accelerate (device_map, needed by quantized loading), with every transitive dependency, as wheels
# for Kaggle's interpreter and platform. What stays out: torch and the CUDA libraries (nvidia-*, triton): the Kaggle
# GPU image ships a CUDA build of torch, and a downloaded one would be gigabytes and could break it.
#
# Environment: PYTHON_VERSION (default 3.11, the Kaggle image's), PLATFORMS (wheel tags, default manylinux up to 2_35),
# EXTRA_PACKAGES (more requirements, space-separated), PIP (default: python -m pip), DRY_RUN=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist/wheelhouse}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
# Kaggle images are Ubuntu 22.04 (glibc 2.35): any of these wheel tags installs there (pip does not widen a tag itself)
PLATFORMS="${PLATFORMS:-manylinux_2_35_x86_64 manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}"
PLATFORM_ARGS=()
for p in $PLATFORMS; do PLATFORM_ARGS+=(--platform "$p"); done
PIP="${PIP:-python -m pip}"
EXTRA_PACKAGES="${EXTRA_PACKAGES:-}"
EXCLUDE_RE='^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$'

run() {
  echo "+ $*"
  if [[ "${DRY_RUN:-0}" != "1" ]]; then "$@"; fi
}

# Base requirements, read from setup.py so this list cannot drift from the package's.
BASE=$(cd "$ROOT" && python - <<'EOF'
import ast
tree = ast.parse(open("setup.py").read())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BASE" for t in node.targets):
        print(" ".join(r for r in ast.literal_eval(node.value) if not r.startswith("torch")))
EOF
)
REQS="$BASE bitsandbytes>=0.45 accelerate>=1.0 $EXTRA_PACKAGES"
echo "wheelhouse: $OUT (python $PYTHON_VERSION, $PLATFORMS)"
echo "requirements (torch excluded): $REQS"
run mkdir -p "$OUT"

# 1. The project itself.
run $PIP wheel --no-deps --wheel-dir "$OUT" "$ROOT"

# 2. Resolve the full dependency set for the target interpreter without installing, then drop torch & CUDA.
#    Through the lock (constraints.txt, without its CPU torch pin): the kernel gets the versions CI tested.
REPORT="$(mktemp -d)/report.json"
LOCK="$(dirname "$REPORT")/constraints.txt"
grep -v -i '^torch==' "$ROOT/constraints.txt" >"$LOCK"
# shellcheck disable=SC2086
run $PIP install --dry-run --ignore-installed --quiet --report "$REPORT" --only-binary=:all: -c "$LOCK" \
  --python-version "$PYTHON_VERSION" "${PLATFORM_ARGS[@]}" --target "$(dirname "$REPORT")/t" $REQS
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  echo "+ (then: pip download --no-deps each resolved name==version not matching $EXCLUDE_RE)"
  exit 0
fi
PINS=$(python - "$REPORT" "$EXCLUDE_RE" <<'EOF'
import json, re, sys
report, exclude = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not exclude.match(name.lower()):
        print(f"{name}=={version}")
EOF
)
echo "downloading $(echo "$PINS" | wc -w) wheels"

# 3. Download exactly those wheels (no dependency resolution: torch must not sneak back in).
# shellcheck disable=SC2086
run $PIP download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" "${PLATFORM_ARGS[@]}" \
  --dest "$OUT" $PINS
echo "done: $(ls "$OUT"/*.whl | wc -l) wheels in $OUT ($(du -sh "$OUT" | cut -f1)); attach it as a Kaggle dataset"
