"""What numba makes of a plain int8 dot-product loop for the CPU it targets, and that its on-disk cache
never hands code built for one CPU kind to another (.ci/aarch64.sh runs this for a Pi 4 and a Pi 5)."""

from __future__ import annotations

import ctypes
import inspect
import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

AARCH64 = platform.machine() in ("aarch64", "arm64")
HWCAP_ASIMDDP = 1 << 20  # AT_HWCAP bit of the dot-product instructions (sdot/udot), Linux arm64
# The CPU kinds CI emulates: Pi 4 (NEON only) and Pi 5 (NEON + dot product).
DOTPROD = {"cortex-a72": False, "cortex-a76": True}


def dot(a: np.ndarray, b: np.ndarray) -> np.int32:
    """Plain loop, as the kernels are written: no intrinsics, LLVM picks the vector instructions."""
    s = np.int32(0)
    for i in range(a.size):
        s += np.int32(a[i]) * np.int32(b[i])
    return s


def _cpu_has_dotprod() -> bool:
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    return bool(libc.getauxval(16) & HWCAP_ASIMDDP)  # 16: AT_HWCAP


@pytest.mark.skipif(not AARCH64, reason="about the code emitted for aarch64")
def test_plain_loop_is_exact_and_uses_what_the_cpu_has() -> None:
    dotprod = _cpu_has_dotprod()
    cpu = numba.config.CPU_NAME
    if cpu in DOTPROD:  # else the host's own CPU: numba targets what it detects
        assert DOTPROD[cpu] == dotprod, f"NUMBA_CPU_NAME={cpu} but this CPU {'has' if dotprod else 'lacks'} sdot"
    dot_ = numba.njit(dot)  # not cached: numba shows no assembly for cached code
    rng = np.random.default_rng(0)
    for n in (1, 15, 16, 100, 4096):
        a = rng.integers(-128, 128, size=n, dtype=np.int8)
        b = rng.integers(-1, 2, size=n, dtype=np.int8)
        assert dot_(a, b) == int(a.astype(np.int64) @ b.astype(np.int64))
    extreme = np.full(4096, -128, dtype=np.int8)
    assert dot_(extreme, extreme) == 4096 * 128 * 128
    asm = dot_.inspect_asm(dot_.signatures[0])
    assert re.search(r"\bv\d+\.16b\b", asm), "the loop was not vectorized over 16 int8 lanes (NEON)"
    assert ("sdot" in asm) == dotprod, f"sdot {'missing' if dotprod else 'emitted'} for {cpu}"


@pytest.mark.skipif(AARCH64, reason="about x86's AVX-512")
def test_avx512_cpus_get_512_bit_vectors_unless_a_target_was_chosen() -> None:
    """On a CPU with AVX-512BW the kernels are built without LLVM's 256-bit preference (the decode
    kernel's zmm registers); NUMBA_CPU_NAME, set for a portable cache, keeps numba's own choice."""
    import llvmlite.binding as llvm

    script = ("import numba, edgebit.backends.numba_kernels as nk; nk._codes_dot.compile("
              "'int32(int16[::1], int16[::1])'); print(numba.config.CPU_FEATURES);"
              "print('zmm' in next(iter(nk._codes_dot.inspect_asm().values())))")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    features, zmm = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                                   text=True).stdout.split()
    if llvm.get_host_cpu_features().get("avx512bw"):
        assert features.endswith(",-prefer-256-bit") and zmm == "True"
    else:
        assert features == "None"
    features, _ = subprocess.run([sys.executable, "-c", script], env=dict(env, NUMBA_CPU_NAME="x86-64-v3"),
                                 check=True, capture_output=True, text=True).stdout.split()
    assert features == "None"


def test_cached_code_is_kept_per_cpu_kind(tmp_path: Path) -> None:
    """Code cached for another CPU kind is compiled (never run) first; this CPU must then compile its own."""
    here = numba.config.CPU_NAME or "host"
    if AARCH64:
        other = "cortex-a72" if here == "cortex-a76" else "cortex-a76"
    else:
        other = "x86-64" if here != "x86-64" else "x86-64-v3"
    (tmp_path / "dotmod.py").write_text("import numpy as np\nfrom numba import njit\n\n@njit(cache=True)\n"
                                        + inspect.getsource(dot))
    script = textwrap.dedent("""
        import sys, numpy as np, dotmod
        if sys.argv[1] == "compile":
            dotmod.dot.compile("int32(int8[::1], int8[::1])")
        else:
            a = np.arange(-128, 128, dtype=np.int8)
            print(dotmod.dot(a, a), sum(dotmod.dot.stats.cache_hits.values()))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def run(cpu: str | None, what: str) -> str:
        e = dict(env)
        if cpu is None:
            e.pop("NUMBA_CPU_NAME", None)
        else:
            e["NUMBA_CPU_NAME"] = cpu
        done = subprocess.run([sys.executable, "-c", script, what], env=e, capture_output=True, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    mine = numba.config.CPU_NAME or None
    run(other, "compile")
    want = str(sum(x * x for x in range(-128, 128)))
    assert run(mine, "run") == [want, "0"]  # a miss: the other kind's entry was not used
    assert run(mine, "run") == [want, "1"]  # its own entry now, from the cache
    assert len(list((tmp_path / "cache").rglob("*.nbc"))) == 2


DECODE_SUM_SCRIPT = """
import numpy as np
from edgebit import quants
import edgebit.backends.numba_kernels as nk

rng = np.random.default_rng(5)
exact = True
for k, extreme in ((128, False), (2560, False), (6912, False), (6912, True)):
    codes = rng.integers(-1, 2, size=(37, k), dtype=np.int8)
    x = rng.integers(-128, 128, size=(1, k), dtype=np.int8)
    if extreme:
        codes[:] = 1
        x[:] = -128
    rows = np.frombuffer(quants.i2s_encode(codes, 1.0), np.uint8)[: codes.size // 4].reshape(37, -1)
    none = rows[:0]
    out, unused = np.empty((1, 37), np.float32), np.empty((1, 0), np.float32)
    nk.i2s_gemv(none, rows, none, x, np.ones(1, np.float32), np.ones((3, 2), np.float32), unused, out, unused)
    exact &= bool(np.array_equal(out[0], (codes.astype(np.int64) @ x[0].astype(np.int64)).astype(np.float32)))
print(nk.SPLIT_DOT_SUMS, exact)
"""


@pytest.mark.skipif(AARCH64, reason="about x86's VNNI")
def test_decode_kernel_sum_follows_vnni_and_both_forms_are_exact() -> None:
    """The decode kernel keeps four sums where the CPU fuses int16 multiply-adds (VNNI) and one
    elsewhere: each form is exact, the four-sum form only where this CPU can run it."""
    import llvmlite.binding as llvm

    host = llvm.get_host_cpu_features()
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    without = dict(host, avx512vnni=False, avxvnni=False)
    without_vnni = ",".join(("+" if on else "-") + name for name, on in without.items())
    runs = [(dict(env, NUMBA_CPU_FEATURES=without_vnni), "False True")]
    if host.get("avx512vnni") or host.get("avxvnni"):
        runs.append((env, "True True"))
    for run_env, want in runs:
        got = subprocess.run([sys.executable, "-c", DECODE_SUM_SCRIPT], env=run_env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert got == want
