#!/usr/bin/env bash
# The device kit: Transformer Engine and megatron-core onto a lent GPU machine that reaches no
# registry and takes at most 64 MiB per call (docs/deployment.md, "The device kit").
#
#   bash tools/device_kit.sh prepare    # here: download the pinned files, split into call folders
#   bash tools/device_kit.sh plan       # here: each device call's carry list and command
#   bash tools/device_kit.sh device STAGE   # there, in the repo root; STAGE is one of
#         stash    keep the parts this call carried (checked) in $KIT_CACHE
#         install  stash, reassemble and check every file, install megatron-core and its
#                  dependencies, the TE core wheel, build transformer_engine_torch (or take
#                  the built wheel), a smoke test; the built wheel is copied to $OUT/kit/
#         checks   install where not done yet, then tools/device_checks.sh (TE cases only
#                  unless KIT_ALL_CASES=1), results under $OUT/checks/
#   bash tools/device_kit.sh rehearse   # here: prepare, split, reassemble, compare, install
#                                       # into a Python 3.12 venv, each step timed
#
# Settings (environment): KIT_DIR (device_kit), KIT_PART_SIZE and KIT_CALL_BUDGET (bytes or
# 56M-style; default: 64 MiB less the working tree less 4 MiB), KIT_CACHE on the device
# (/var/tmp/srp_device_kit: kept between the calls of one warm lease), PYTHON, KIT_REHEARSAL=1
# (the device stages stop before the TE build: how `rehearse` runs them without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

KIT_DIR=${KIT_DIR:-device_kit}
PYTHON=${PYTHON:-python3}
DK=megatron_srp/deploy/device_kit.py
# The pinned set, in install order. Python 3.12, manylinux x86_64, CUDA 13 (the device's torch
# is 2.11.0+cu130). Only what the device image lacks (docs/deployment.md says why each).
WHEELS=(
    typing-extensions==4.16.0 annotated-types==0.8.0 typing-inspection==0.4.5
    pydantic-core==2.50.5 pydantic==2.14.4 importlib-metadata==8.7.0
    antlr4-python3-runtime==4.13.2 omegaconf==2.4.0 nvdlfw-inspect==0.2.2
    megatron-core==0.16.1
    nvidia-cudnn-frontend==1.29.0 transformer-engine-cu13==2.20.2 transformer-engine==2.20.2
)
SDIST=transformer-engine-torch==2.20.2

T0=$(date +%s%N)
secs() { local ms=$(( ($(date +%s%N) - $1) / 1000000 )); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
step() {  # step NAME COMMAND...: runs it, prints its elapsed time; stops the script on failure
    local name=$1 t rc=0
    shift
    t=$(date +%s%N)
    echo "[kit] $name ..."
    "$@" || rc=$?
    printf '[kit] %-22s %7s s  (rc %d, %s s since start)\n' "$name" "$(secs "$t")" "$rc" \
        "$(secs "$T0")"
    [ "$rc" = 0 ] || { echo "[kit] FAILED: $name"; exit "$rc"; }
}

wheel_file() {  # NAME==VERSION -> the downloaded wheel's path
    local name=${1%%==*} version=${1##*==}
    name=$(echo "$name" | tr '[:upper:]-' '[:lower:]_')
    compgen -G "$KIT_DIR/dl/${name}-${version}-*.whl" | head -n 1
}

download() {
    mkdir -p "$KIT_DIR/dl"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT_DIR/dl" "${WHEELS[@]}" || return
    "$PYTHON" "$DK" fetch-sdist "$SDIST" --dest "$KIT_DIR/dl"
}

kit_files() {  # the files to carry, in install order; a built TE torch wheel replaces the sdist
    local spec built
    for spec in "${WHEELS[@]}"; do wheel_file "$spec"; done
    built=$(compgen -G "$KIT_DIR/built/transformer_engine_torch-*.whl" | head -n 1 || true)
    if [ -n "$built" ]; then echo "$built"; else
        compgen -G "$KIT_DIR/dl/transformer_engine_torch-${SDIST##*==}.tar.gz"; fi
}

call_budget() {  # bytes of parts per call: 64 MiB less the working tree less 4 MiB
    "$PYTHON" -c "import sys; sys.path.insert(0, 'megatron_srp/deploy'); import device_kit as d; \
print((d.CALL_LIMIT - d.tree_bytes(d.Path('.')) - 4 * d.MIB) // d.MIB * d.MIB)"
}

do_split() {
    local budget files
    budget=${KIT_CALL_BUDGET:-$(call_budget)}
    mapfile -t files < <(kit_files)
    [ "${#files[@]}" = $((${#WHEELS[@]} + 1)) ] || { echo "missing downloads: ${files[*]}"; return 1; }
    "$PYTHON" "$DK" split "${files[@]}" --out "$KIT_DIR/calls" \
        --part-size "${KIT_PART_SIZE:-$budget}" --call-budget "$budget" \
        --meta "{\"pinned\": \"${WHEELS[*]} $SDIST\", \"python\": \"3.12\"}"
}

prepare() {
    step download download
    step split do_split
    grep -qx '/device_kit/' .gitignore || echo "note: device_kit/ is not in .gitignore"
    echo "[kit] files:"
    "$PYTHON" - "$KIT_DIR/calls/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for e in m["files"]:
    calls = sorted({p["call"] for p in e["parts"]})
    print(f"  {e['file']}  {e['size']:,} B  sha256 {e['sha256']}  parts {len(e['parts'])}"
          f"  calls {calls}")
print(f"  {sum(len(e['parts']) for e in m['files'])} parts, {m['calls']} calls of parts")
EOF
}

plan() {
    "$PYTHON" "$DK" plan --manifest "$KIT_DIR/calls/manifest.json" --kit-dir "$KIT_DIR/calls"
    echo "Make the calls back to back: a lent machine waits 30 s after a call before it is"
    echo "given back, and the parts stashed so far go with it. Then call give_back."
}

# ---- on the device ----
kit_ready() {
    "$PYTHON" -c "import transformer_engine_torch, transformer_engine.pytorch, megatron.core, omegaconf" \
        2>/dev/null
}

pip_install() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile "$@"; }

install_deps() {
    local f files=()
    for f in "$CACHE"/files/*.whl; do
        case $(basename "$f") in nvidia_cudnn_frontend-*|transformer_engine*) ;; *) files+=("$f");; esac
    done
    pip_install "${files[@]}"
}

install_te_core() {  # the second pip step: TE's core library, its meta package, cuDNN's headers
    pip_install "$CACHE"/files/nvidia_cudnn_frontend-*.whl \
        "$CACHE"/files/transformer_engine_cu13-*.whl "$CACHE"/files/transformer_engine-*.whl
}

build_te_torch() {
    mkdir -p "$CACHE/built"
    if compgen -G "$CACHE/built/transformer_engine_torch-*.whl" >/dev/null; then
        echo "built wheel cached: $(ls "$CACHE"/built/transformer_engine_torch-*.whl)"; return 0
    fi
    if compgen -G "$CACHE/files/transformer_engine_torch-*.whl" >/dev/null; then
        cp "$CACHE"/files/transformer_engine_torch-*.whl "$CACHE/built/"; echo "built wheel carried"
        return 0
    fi
    NVTE_CUDA_ARCHS=90 MAX_JOBS=16 NVTE_BUILD_MAX_JOBS=16 NVTE_FRAMEWORK=pytorch \
        NVTE_PYTORCH_FORCE_BUILD=TRUE \
        "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$CACHE/built" \
        "$CACHE"/files/transformer_engine_torch-*.tar.gz
}

export_built() {  # the built wheel back to this machine through $OUT (16 MiB per file)
    local w
    w=$(ls "$CACHE"/built/transformer_engine_torch-*.whl)
    mkdir -p "$OUT/kit"
    echo "built: $(basename "$w") $(stat -c %s "$w") B sha256 $(sha256sum "$w" | cut -d' ' -f1)"
    split -b 15M -d -a 2 "$w" "$OUT/kit/te_torch_whl.part"
}

smoke() {
    "$PYTHON" - <<'EOF'
import torch, transformer_engine, transformer_engine.pytorch as te, megatron.core
from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling
print("te", transformer_engine.__version__, "mcore", megatron.core.__version__,
      "torch", torch.__version__, torch.cuda.get_device_name())
lin = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda()
x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for recipe in (DelayedScaling(), Float8CurrentScaling()):
    with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
        y = lin(x)
    y.float().sum().backward()
    print(type(recipe).__name__, "fp8 forward/backward ok", tuple(y.shape))
EOF
}

device() {
    local stage=${1:-install} manifest
    CACHE=${KIT_CACHE:-/var/tmp/srp_device_kit}
    OUT=${OUT:-$CACHE/out}
    mkdir -p "$CACHE" "$OUT"
    exec > >(tee -a "$OUT/kit-$stage.log") 2>&1
    if [ "$stage" = checks ] && kit_ready; then
        echo "[kit] already installed in this lease"
    else
        manifest=$(compgen -G "$KIT_DIR/calls/c[0-9][0-9]/manifest.json" | head -n 1 || true)
        [ -n "$manifest" ] && cp "$manifest" "$CACHE/manifest.json"
        [ -f "$CACHE/manifest.json" ] || { echo "[kit] no manifest: carry $KIT_DIR/calls/cNN" \
            "(and if this call is not the first, the lease ended in between: start at call 1)"
            exit 2; }
        step stash "$PYTHON" "$DK" stash --manifest "$CACHE/manifest.json" \
            --search "$KIT_DIR/calls" --dest "$CACHE/parts"
        [ "$stage" = stash ] && return 0
        if kit_ready; then echo "[kit] already installed in this lease"; else
            step assemble+sha256 "$PYTHON" "$DK" assemble --manifest "$CACHE/manifest.json" \
                --search "$CACHE/parts" --dest "$CACHE/files"
            rm -rf "$CACHE/parts" "$KIT_DIR/calls"   # the files are checked: free the disk
            step install-mcore+deps install_deps
            step install-te-core install_te_core
            if [ "${KIT_REHEARSAL:-0}" = 1 ]; then
                echo "[kit] rehearsal: stopping before the TE build (it needs torch and CUDA)"
                return 0
            fi
            step build-te-torch build_te_torch
            step install-te-torch pip_install "$CACHE"/built/transformer_engine_torch-*.whl
            step export-built export_built
        fi
        step smoke-fp8 smoke
    fi
    if [ "$stage" = checks ]; then
        [ "${KIT_ALL_CASES:-0}" = 1 ] || export DEVICE_CHECKS_TE_ONLY=1
        # 3 TE benches x 130 s + the TE tests 200 s: inside one 600 s call at worst
        export STEP_TIMEOUT=${STEP_TIMEOUT:-130} PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-200}
        step device-checks env OUT="$OUT/checks" PYTHON="$PYTHON" bash tools/device_checks.sh
    fi
}

# ---- the rehearsal, here ----
# What the device image already holds, of what the kit's packages require (KINDS.md's list).
DEVICE_HAS="torch numpy packaging pyyaml einops onnx onnxscript zipp typing-extensions setuptools
wheel pip"

rehearse() {
    local tmp py312 f orig
    tmp=$(mktemp -d /tmp/device_kit_rehearsal.XXXXXX)
    step prepare prepare
    step plan plan
    # the device's stash calls, one carried folder at a time, then the reassembly
    sim() {
        local c
        for c in "$KIT_DIR"/calls/c[0-9][0-9]; do
            echo "  after $(basename "$c"):"
            "$PYTHON" "$DK" stash --manifest "$c/manifest.json" --search "$c" --dest "$tmp/parts" \
                | grep -v 'still to come' || return
        done
    }
    step stash-per-call sim
    step assemble+sha256 "$PYTHON" "$DK" assemble --manifest "$KIT_DIR/calls/manifest.json" \
        --search "$tmp/parts" --dest "$tmp/files"
    compare() {
        local bad=0
        for f in "$tmp"/files/*; do
            orig=$(compgen -G "$KIT_DIR/*/$(basename "$f")" | grep -v /calls/ | head -n 1)
            if cmp "$f" "$orig" && [ "$(sha256sum <"$f")" = "$(sha256sum <"$orig")" ]; then
                echo "  identical (cmp, sha256): $(basename "$f")"
            else echo "  DIFFERS: $(basename "$f")"; bad=1; fi
        done
        return "$bad"
    }
    step cmp-with-originals compare
    py312=${PY312:-}
    for f in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        [ -z "$py312" ] && "$f" -c '' 2>/dev/null && py312=$f
    done
    if [ -z "$py312" ]; then
        install_check() {  # no Python 3.12 here: pip's cross-platform install into a folder
            local files=()
            mapfile -t files < <(kit_files | grep '\.whl$')
            "$PYTHON" -m pip install -q --no-deps --no-index --only-binary=:all: --target \
                "$tmp/target312" --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 "${files[@]}"
        }
        step install-py312-target install_check
    else
        install_check() {
            "$py312" -m venv "$tmp/venv312" || return
            local files=()
            mapfile -t files < <(kit_files | grep '\.whl$')
            "$tmp/venv312/bin/python" -m pip install -q --no-index --no-deps --no-compile \
                "${files[@]}" || return
            # what imports without the image's packages (omegaconf needs its yaml, TE its CUDA)
            "$tmp/venv312/bin/python" -c "import pydantic, antlr4, annotated_types; \
print('  imports ok: pydantic', pydantic.__version__, 'and its dependencies, antlr4')" || return
            "$tmp/venv312/bin/python" -m pip list 2>/dev/null | tail -n +3 | sed 's/^/    /'
            "$tmp/venv312/bin/python" -m pip check 2>/dev/null | grep -v ' requires ' | sed 's/^/  /'

            echo "  requirements left to the device image (pip check):"
            "$tmp/venv312/bin/python" -m pip check 2>/dev/null | sed -n 's/.* requires \([^,]*\),.*/\1/p' \
                | sort -u | while read -r req; do
                    if echo " $DEVICE_HAS " | tr '\n' ' ' | grep -qi " $req "; then
                        echo "    $req: in the device image"
                    else echo "    $req: NOT carried (see docs/deployment.md)"; fi
                done || true
        }
        step install-py312-venv install_check
        device_sim() {  # the device's own stages, one carried call folder at a time, into a
            # fresh Python 3.12 venv; KIT_REHEARSAL=1 stops them before the TE build
            local c stage last kd=$tmp/devkit
            "$py312" -m venv "$tmp/venvdev" || return
            last=$(printf '%s\n' "$KIT_DIR"/calls/c[0-9][0-9] | tail -n 1)   # globs sort
            for c in "$KIT_DIR"/calls/c[0-9][0-9]; do
                rm -rf "$kd" && mkdir -p "$kd/calls" && cp -rl "$c" "$kd/calls/" || return
                stage=stash
                [ "$c" = "$last" ] && stage=install
                echo "  call $(basename "$c"): device $stage"
                KIT_DIR=$kd KIT_CACHE=$tmp/devcache OUT=$tmp/devout PYTHON=$tmp/venvdev/bin/python \
                    KIT_REHEARSAL=1 bash tools/device_kit.sh device "$stage" \
                    | grep -v 'still to come' | sed 's/^/    /' || return
            done
            "$tmp/venvdev/bin/python" -m pip list 2>/dev/null | grep -ciE \
                '^(megatron[-_]core|transformer[-_]engine|transformer[-_]engine[-_]cu13|omegaconf) ' \
                | grep -qx 4 && echo "  megatron-core, omegaconf and TE's core installed by the device stages"
        }
        step device-stages-py312 device_sim
    fi
    sdist_check() {
        local s
        s=$(compgen -G "$KIT_DIR/dl/transformer_engine_torch-*.tar.gz" | head -n 1)
        tar tzf "$s" | grep -E '^[^/]+/(setup.py|pyproject.toml|PKG-INFO)$' || return
        unzip -l "$(wheel_file nvidia-cudnn-frontend==1.29.0)" | grep -q 'include/cudnn_frontend.h' \
            && echo "  cudnn_frontend.h present (TE's build needs the headers)"
    }
    step sdist+headers sdist_check
    rm -rf "$tmp"
}

case ${1:-} in
    prepare) prepare ;;
    split) do_split ;;
    plan) plan ;;
    device) device "${2:-install}" ;;
    rehearse) rehearse ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
