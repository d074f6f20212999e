#!/usr/bin/env bash
# Run a bounded subset of the tests on aarch64 under qemu user-mode emulation (issue 9): the numba
# kernels are plain loops so that one source vectorizes for NEON on a Raspberry Pi, and this is where
# we show they compile and give exact results there. No binfmt or kernel change is needed:
#
#   * a sysroot holds Debian's arm64 python3.11 (apt-get download with a private apt configuration,
#     unpacked by dpkg-deb -x) and aarch64 wheels of the dependencies (pip --platform, --target);
#   * SYSROOT/usr/bin/python3.11-qemu runs that python under qemu-aarch64 with argv[0] kept, and
#     BIN/python3 links to it, so sys.executable re-enters the emulator and the kernels' helper
#     processes (python -m edgebit.backends.lanes) run emulated too;
#   * pytest runs once per CPU kind, side by side: cortex-a72 (Pi 4, NEON only) and cortex-a76 (Pi 5,
#     LLVM emits sdot there), each with its own NUMBA_CACHE_DIR so code built for one never runs on
#     the other.
#
# The environment is built once into a cache outside the work tree and reused while its recipe (the
# package lists below, the host's Debian sources) is unchanged, so a second run only runs the tests.
#
# Usage: .ci/aarch64.sh [pytest arguments...]   (default: DEFAULT_TESTS below)
# Environment: EDGEBIT_CI_CACHE (cache root, default ~/.cache/edgebit-ci),
#              EDGEBIT_AARCH64_CPUS (default "cortex-a72 cortex-a76").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${EDGEBIT_CI_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/edgebit-ci}/aarch64
SYSROOT=$CACHE/sysroot
SITE=$CACHE/site-packages
BIN=$CACHE/bin
read -r -a CPUS <<<"${EDGEBIT_AARCH64_CPUS:-cortex-a72 cortex-a76}"

# What the emulated run covers, measured to fit ~5 min per CPU kind here: numba's code per CPU kind, the
# compiled kernels' exactness on small shapes, every backend's identical logits and greedy text on the
# tiny random model, and llama.cpp's tokenizer vectors. (test_every_backend_gives_the_same_logits_and_
# perplexity would add ~100 s per kind: pass it as an argument to run it.) A file that does not exist
# (yet) is skipped with a note; a test id that no longer exists fails the run.
DEFAULT_TESTS=(
  tests/test_numba_arch.py
  tests/test_numba_kernels.py
  tests/test_backends.py::test_products_are_exact_on_any_shape
  tests/test_backends.py::test_extreme_sums_stay_exact
  tests/test_backends.py::test_weights_from_other_file_types
  tests/test_backends.py::test_models_give_identical_logits_and_greedy_text
  tests/test_backends.py::test_lm_head_forms_and_lanes_give_the_same_bits
  tests/test_tokenizer.py::test_vector_files_hold_46_cases
  tests/test_tokenizer.py::test_llamacpp_vector
)
# numba's on-disk cache under EDGEBIT_HOME works alike on every CPU (tests/test_numba_arch.py covers
# what is per CPU kind); emulated it compiles every kernel in two fresh processes, 1.5 min.
DEFAULT_DESELECT=(
  tests/test_numba_kernels.py::test_compiled_code_is_cached_under_edgebit_home
)
# Hypothesis examples per property in tests/test_numba_kernels.py (60 natively).
export EDGEBIT_TEST_EXAMPLES=${EDGEBIT_TEST_EXAMPLES:-15}

# Debian (arm64) packages whose dependency closure makes the sysroot: python with its whole standard
# library (ssl, sqlite3, ctypes, decimal, multiprocessing), and the runtime libraries numba's wheels
# link against. Packages only maintainer scripts need are left out, and so is what only they pull in.
DEB_ROOTS=(python3.11 libgomp1 libstdc++6)
DEB_SKIP=(dpkg install-info perl perl-base debconf tar)

# aarch64 cp311 wheels (the versions the host's CI installs today); pip resolves what they depend on.
PIP_PINS=(
  numpy==2.4.6 numexpr==2.14.2 numba==0.68.1 llvmlite==0.50.0 tokenizers==0.23.3 gguf==0.19.0
  paho-mqtt==2.2.0 click==8.5.1 platformdirs==4.14.9
  pytest==9.2.0 pytest-timeout==2.4.0 hypothesis==6.170.17
)
# Debian 12 has glibc 2.36: every manylinux tag up to that one runs there.
PIP_PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none
              --platform manylinux2014_aarch64)
for minor in $(seq 17 36); do PIP_PLATFORM+=(--platform "manylinux_2_${minor}_aarch64"); done

say() { printf '\n=== aarch64: %s\n' "$*"; }

# --- host tools -------------------------------------------------------------------------------------

if ! command -v qemu-aarch64 >/dev/null 2>&1; then
  say "installing qemu-user"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
fi
HOST_PY=$(command -v python3)

# --- the Debian mirror the host uses ----------------------------------------------------------------

# One "URI suite" line per Debian source of this release, from the host's deb822 and one-line files;
# entries for other releases or third-party repositories are left out.
host_debian_sources() {
  local codename
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  {
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
      awk 'BEGIN { RS = ""; FS = "\n" }
           { types = uris = suites = ""
             for (i = 1; i <= NF; i++) {
               if ($i ~ /^Types:/) types = $i; if ($i ~ /^URIs:/) uris = $i; if ($i ~ /^Suites:/) suites = $i }
             if (types !~ /[ \t]deb([ \t]|$)/) next
             n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
             for (a = 2; a <= n; a++) for (b = 2; b <= m; b++) print u[a], s[b] }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      sed -E -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" { print $2, $3 }'
    done
  } | awk -v c="$codename" '$2 == c || index($2, c "-") == 1' | sort -u
}

# --- cache state ------------------------------------------------------------------------------------

# Bump "setup vN" when the setup steps change in a way the lists do not show.
recipe() {
  printf '%s\n' "setup v1" "${DEB_ROOTS[*]}" "${DEB_SKIP[*]}" "${PIP_PINS[*]}" "${PIP_PLATFORM[*]}"
  host_debian_sources
}
RECIPE_HASH=$(recipe | sha256sum | cut -d' ' -f1)

# --- setup: sysroot from Debian's arm64 packages ----------------------------------------------------

APT_DIR=$CACHE/apt
apt_() {
  "$@" -o Dir::Etc="$APT_DIR/etc" -o Dir::State="$APT_DIR/state" -o Dir::Cache="$APT_DIR/cache" \
    -o Dir::State::status="$APT_DIR/state/status" -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
    -o APT::Sandbox::User=root  # the cache may be where the _apt user cannot write
}

# The roots and, recursively, what they Depend / Pre-Depend on (first choice of an alternative),
# without DEB_SKIP and what only those need. Virtual packages (<name>) are only maintainer-script needs.
deb_closure() {
  local -A seen=()
  local -a queue=("$@")
  local p s
  for s in "${DEB_SKIP[@]}"; do seen[$s]=1; done
  while ((${#queue[@]})); do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    [ -n "${seen[$p]:-}" ] && continue
    seen[$p]=1
    echo "$p"
    mapfile -t -O "${#queue[@]}" queue < <(apt_ apt-cache depends -i "$p" | awk '
      NR > 1 && /Depends:/ { if (!alt && $2 !~ /^</) { sub(/:.*/, "", $2); print $2 } alt = ($1 ~ /^\|/) }')
  done
}

setup_sysroot() {
  mkdir -p "$APT_DIR"/{etc/apt.conf.d,etc/preferences.d,etc/sources.list.d,state/lists/partial,cache/archives/partial}
  : >"$APT_DIR/state/status"
  local uri suite
  while read -r uri suite; do
    echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main"
  done < <(host_debian_sources) >"$APT_DIR/etc/sources.list"
  if [ ! -s "$APT_DIR/etc/sources.list" ]; then
    echo "no Debian source for this release in /etc/apt/sources.list*" >&2
    exit 1
  fi
  apt_ apt-get update -qq
  mapfile -t pkgs < <(deb_closure "${DEB_ROOTS[@]}")
  echo "${#pkgs[@]} packages: ${pkgs[*]}"
  mkdir -p "$CACHE/debs" "$SYSROOT"
  (cd "$CACHE/debs" && apt_ apt-get download -qq "${pkgs[@]}")
  for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
  du -sh "$CACHE/debs" | cut -f1 | sed 's/^/downloaded /'

  # argv[0] stays the path this script was run as, so sys.executable re-enters the emulator. The script
  # lives in the sysroot so python, resolving the link from BIN, finds its standard library beside it.
  # QEMU_CPU comes from the environment.
  cat >"$SYSROOT/usr/bin/python3.11-qemu" <<EOF
#!/bin/sh
exec qemu-aarch64 -L "$SYSROOT" -0 "\$0" "$SYSROOT/usr/bin/python3.11" "\$@"
EOF
  chmod +x "$SYSROOT/usr/bin/python3.11-qemu"
  mkdir -p "$BIN"
  for name in python python3 python3.11; do ln -sfn "$SYSROOT/usr/bin/python3.11-qemu" "$BIN/$name"; done
}

# This machine's pip configuration names local indexes that may be absent; pip warns once per package.
quiet_pip() { "$HOST_PY" -m pip "$@" 2> >(grep -v -e "^WARNING: Location 'file:" -e "^WARNING: Running pip as" >&2); }

setup_wheels() {
  quiet_pip download -q -d "$CACHE/wheels" "${PIP_PLATFORM[@]}" "${PIP_PINS[@]}"
  quiet_pip install -q --no-index --find-links "$CACHE/wheels" --target "$SITE" "${PIP_PLATFORM[@]}" \
    "${PIP_PINS[@]}"
  du -sh "$CACHE/wheels" | cut -f1 | sed 's/^/downloaded /'
}

# Compiling the standard library and the wheels' modules is ~100x slower emulated and this machine sets
# PYTHONDONTWRITEBYTECODE: compile them here once (3.11 bytecode is the same on every 3.11.x), into one
# PYTHONPYCACHEPREFIX tree that the emulated runs read (the repo's modules join it before each run).
# Only a speed-up: a file that does not compile (test data in some packages) is compiled, or fails, as usual.
precompile() {
  if "$HOST_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PYTHONPYCACHEPREFIX=$CACHE/pycache "$HOST_PY" -m compileall -q -j 0 "$SYSROOT/usr/lib/python3.11" "$SITE" \
      >/dev/null || true
  else
    echo "host python is not 3.11: modules will be compiled under emulation, on every start"
  fi
}

start=$SECONDS
if [ "$(cat "$CACHE/complete" 2>/dev/null)" = "$RECIPE_HASH" ]; then
  say "reusing the environment in $CACHE"
else
  say "building the environment in $CACHE"
  rm -rf "$CACHE"
  mkdir -p "$CACHE"
  setup_sysroot
  setup_wheels
  precompile
  echo "$RECIPE_HASH" >"$CACHE/complete"
fi

# --- run --------------------------------------------------------------------------------------------

export PATH="$BIN:$PATH"
# The standard-library modules pytest, hypothesis and the helpers need must load from the sysroot.
machine=$(python3 -c 'import ctypes, _decimal, multiprocessing, platform, sqlite3, ssl; print(platform.machine())')
if [ "$machine" != aarch64 ]; then
  echo "python3 in $BIN is not the emulated aarch64 one" >&2
  exit 1
fi
echo "$(python3 -VV | head -1) on $machine, $(qemu-aarch64 --version | head -1)"

if (($#)); then
  tests=("$@")
else
  tests=()
  for t in "${DEFAULT_TESTS[@]}"; do
    if [ -e "${t%%::*}" ]; then tests+=("$t"); else echo "note: ${t%%::*} does not exist here; skipped"; fi
  done
  for t in "${DEFAULT_DESELECT[@]}"; do tests+=(--deselect "$t"); done
fi

# The repo is imported from its source tree, with the metadata an install would give it (the entry
# points of pyproject.toml, where backends are found) beside it; its bytecode goes to a cache outside
# the tree, made here.
META=$CACHE/meta
rm -rf "$META"
"$HOST_PY" - "$REPO/pyproject.toml" "$META" <<'PY'
import sys, tomllib
from pathlib import Path

project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
info = Path(sys.argv[2]) / f"{project['name']}-{project['version']}.dist-info"
info.mkdir(parents=True)
info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
         for group, eps in [("console_scripts", project.get("scripts", {})), *project.get("entry-points", {}).items()]]
info.joinpath("entry_points.txt").write_text("\n".join(lines))
PY
export PYTHONPATH="$SITE:$REPO:$META"
export PYTHONPYCACHEPREFIX=$CACHE/pycache
PYTHONPYCACHEPREFIX=$CACHE/pycache "$HOST_PY" -m compileall -q -j 0 "$REPO/edgebit" "$REPO/tests" >/dev/null || true
echo "environment ready in $((SECONDS - start)) s"

runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
# The CPU kinds run side by side: an emulated test process keeps about one core busy, and one after
# the other they took 17 of CI's 30 minutes on a slow host. Each prints its log when it is done.
pids=()
for cpu in "${CPUS[@]}"; do
  work=$runs/$cpu  # its own numba cache, EDGEBIT_HOME and pytest temp: nothing carries over between kinds
  mkdir -p "$work"
  (
    start=$SECONDS
    status=0
    QEMU_CPU=$cpu NUMBA_CPU_NAME=$cpu NUMBA_CACHE_DIR=$work/numba EDGEBIT_HOME=$work/home \
      HYPOTHESIS_STORAGE_DIRECTORY=$work/hypothesis \
      python3 -m pytest -p no:cacheprovider -q --durations=8 --basetemp="$work/pytest" "${tests[@]}" || status=$?
    echo "$cpu: pytest exit $status in $((SECONDS - start)) s"
    exit "$status"
  ) >"$runs/$cpu.log" 2>&1 &
  pids+=("$!")
done
failed=()
for i in "${!CPUS[@]}"; do
  status=0
  wait "${pids[$i]}" || status=$?
  say "pytest on ${CPUS[$i]}"
  cat "$runs/${CPUS[$i]}.log"
  rm -rf "${runs:?}/${CPUS[$i]}"
  [ "$status" = 0 ] || failed+=("${CPUS[$i]}")
done

if ((${#failed[@]})); then
  say "FAILED on: ${failed[*]}"
  exit 1
fi
say "passed on: ${CPUS[*]}"
