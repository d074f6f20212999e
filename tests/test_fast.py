"""The optional compiled kernels as a user meets them: chosen when installed, announced while compiling,
reported by doctor and backends, and absent without breaking anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgebit
from edgebit.backends import fast

pytestmark = pytest.mark.skipif(fast.kernels() is None, reason=fast.unavailable_reason())

# Runs a command of edgebit's CLI in a process where `import numba` fails, as on a machine without it.
WITHOUT_NUMBA = "import sys; sys.modules['numba'] = None; from edgebit.cli import main; main(sys.argv[1:])"


def _cli(args: list[str], home: Path, without_numba: bool = False,
         own_cache: bool = False) -> subprocess.CompletedProcess[str]:
    """Run an edgebit command with EDGEBIT_HOME=home; own_cache: the kernels cache in that home too
    (the suite otherwise shares one through NUMBA_CACHE_DIR, tests/conftest.py)."""
    code = WITHOUT_NUMBA if without_numba else "import sys; from edgebit.cli import main; main(sys.argv[1:])"
    env = {**os.environ, "EDGEBIT_HOME": str(home)}
    if own_cache:
        env.pop("NUMBA_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


def test_load_reports_kernel_compilation(tiny_model: Path) -> None:
    calls: list[tuple[int, int]] = []
    model = edgebit.load(tiny_model, backend="numba", compile_progress=lambda done, total: calls.append((done, total)))
    total = len(fast.kernels().SIGNATURES)
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert model.info["backend"] == "numba" and model.transformer.lm_head.mode == "screened"


def test_without_numba_everything_falls_back_and_says_why(tiny_model: Path, tmp_path: Path) -> None:
    backends = _cli(["backends", "--json"], tmp_path, without_numba=True)
    assert backends.returncode == 0, backends.stderr
    rows = {row["name"]: row for row in json.loads(backends.stdout)["backends"]}
    assert not rows["numba"]["supported"] and "pip install 'edgebit[fast]'" in rows["numba"]["why_not"]
    assert json.loads(backends.stdout)["choice"]["backend"] != "numba"
    doctor = _cli(["doctor"], tmp_path, without_numba=True)
    kernels = next(line for line in doctor.stdout.splitlines() if line.startswith("kernels"))
    assert "numpy only" in kernels and "pip install 'edgebit[fast]'" in kernels
    run = _cli(["generate", str(tiny_model), "hello", "-n", "4", "--temp", "0"], tmp_path, without_numba=True)
    with_numba = _cli(["generate", str(tiny_model), "hello", "-n", "4", "--temp", "0", "--backend", "numba"],
                      tmp_path)
    assert run.returncode == 0 and with_numba.returncode == 0, run.stderr + with_numba.stderr
    assert run.stdout == with_numba.stdout  # the same greedy text with and without the compiled kernels


def test_doctor_says_whether_the_compiled_code_is_cached(tmp_path: Path) -> None:
    first = _cli(["doctor", "--json"], tmp_path, own_cache=True)
    second = _cli(["doctor", "--json"], tmp_path, own_cache=True)
    cold, warm = json.loads(first.stdout)["kernels"], json.loads(second.stdout)["kernels"]
    assert cold["available"] and cold["cached"] == 0
    assert warm["cached"] == warm["kernels"] and warm["cache_dir"].startswith(str(tmp_path))
    text = _cli(["doctor"], tmp_path, own_cache=True).stdout
    assert "cache warm" in text and f"LLVM target {warm['llvm_cpu']}" in text
    assert ("512-bit vectors" in text) == warm["wide_vectors"]


# A cold compile in a fresh cache; argv[1] "failing" makes the helper process exit at once.
COLD_COMPILE = """
import json, sys
from edgebit.backends import numba_kernels as kernels
if sys.argv[1] == "failing":
    sys.executable = "/bin/false"
kernels.compile_all()
print(json.dumps({"helper": sorted(kernels._COMPILED_BY_HELPER), "cached": kernels.cache_hits(),
                  "compiled": sum(sum(k.stats.cache_misses.values()) for k in kernels.SIGNATURES)}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/bin/false").exists(), reason="needs 2 cores and /bin/false")
def test_a_helper_process_compiles_the_prompt_kernel_on_a_cold_cache(tmp_path: Path) -> None:
    """On a cold cache a second process compiles HELPER_KERNELS while this one compiles the rest, and
    this one loads them from the cache; a helper that fails leaves them to be compiled here."""
    kernels = fast.kernels()
    runs = {}
    for how in ("helper", "failing"):
        env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / how)}
        run = subprocess.run([sys.executable, "-c", COLD_COMPILE, how], env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        runs[how] = json.loads(run.stdout)
    total = len(kernels.SIGNATURES)
    helped = len(kernels.HELPER_KERNELS)
    assert runs["helper"] == {"helper": sorted(kernels.HELPER_KERNELS), "cached": 0, "compiled": total - helped}
    assert runs["failing"] == {"helper": [], "cached": 0, "compiled": total}


def test_head_gives_identical_logits_in_both_exact_modes(tiny_model: Path) -> None:
    half = edgebit.load(tiny_model, backend="numba", lm_head="float16")
    single = edgebit.load(tiny_model, backend="numba", lm_head="float32")
    ids = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(half.logits(ids), single.logits(ids))


def test_token_lookups_read_the_heads_copy_not_the_file(tiny_model: Path) -> None:
    """With the compiled f16 head the embedding is copied out of the file at load; looking tokens up
    in the file mapping again would fault its pages back into the resident set."""
    from edgebit.backends.memory import _mapping_of

    model = edgebit.load(tiny_model, backend="numba", lm_head="float16")
    head = model.transformer.lm_head
    assert _mapping_of(head.embedding) is None
    assert head.embedding.dtype == np.float16
    assert np.shares_memory(head.embedding, head.exact_source)
    numpy_only = edgebit.load(tiny_model, backend="dense")
    np.testing.assert_array_equal(head.embedding, numpy_only.transformer.lm_head.embedding)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0, "repeat_penalty": 1.3},
                                      {"temperature": 0.9, "top_k": 5, "seed": 3},
                                      {"temperature": 0.9, "top_k": 40, "repeat_penalty": 1.2, "seed": 4}])
def test_screened_head_generates_what_the_full_head_does(tiny_model: Path, sampling: dict) -> None:
    """Greedy and top-k sampling (penalised or not) read only a few exact logits from the screened
    head, and produce the same tokens as from every logit; one sequence at a time or stepped together."""
    from edgebit.backends.lm_head import TopK
    from edgebit.sampling import Sampler, SamplingParams

    screened = edgebit.load(tiny_model, backend="numba")
    full = edgebit.load(tiny_model, backend="numba", lm_head="float16")
    kept = np.isfinite(screened.prefill(screened.new_cache(), [1, 2, 3], top=TopK(1)))
    assert 0 < kept.sum() < kept.size  # the screen does rule tokens out on this model
    prompts = ["hello there", "the boiler is at 95C and", "x"]
    for prompt in prompts:
        assert screened.generate(prompt, max_tokens=16, **sampling) == full.generate(prompt, max_tokens=16, **sampling)

    def stepped(model: edgebit.Model) -> list[list[int]]:
        seqs = [model.start(model.tokenizer.encode(p), 12, Sampler(SamplingParams(**sampling))) for p in prompts]
        while not all(seq.done for seq in seqs):
            model.step(seqs)
        return [seq.gen.token_ids for seq in seqs]

    assert stepped(screened) == stepped(full)


def _present_pages(array: np.ndarray) -> int:
    """How many of the pages wholly inside `array` are mapped into this process now
    (/proc/self/pagemap's present bit; the pages at its ends may hold other tensors too)."""
    import mmap

    first = -(-array.ctypes.data // mmap.PAGESIZE)
    last = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE - 1
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux's /proc/self/pagemap")
def test_screened_head_keeps_no_f16_pages(tiny_model: Path) -> None:
    """The screened head reads its f16 rows from the file and gives the pages back after every
    lookup, every exact column and every full call: none stays in the resident set."""
    from edgebit.backends.memory import _mapping_of

    model = edgebit.load(tiny_model, backend="numba")
    head = model.transformer.lm_head
    assert head.mode == "screened" and _mapping_of(head.exact_source) is not None
    model.generate("hello there", max_tokens=4, temperature=0)
    model.generate("hello there", max_tokens=4, temperature=0.8, top_k=0, seed=1)  # full logits
    model.classify("boiler 95C", labels=["ok", "critical"])
    assert _present_pages(head.exact_source) == 0
    np.asarray(head.exact_source[:50]).sum()  # the check itself sees pages that are read
    assert _present_pages(head.exact_source) > 0


# Greedy and top-k generation with the screened head's f16 table made unreadable through the mapping.
UNMAPPED_ROWS = """
import ctypes, mmap, sys
import edgebit
model = edgebit.load(sys.argv[1], backend="numba")
table = model.transformer.lm_head.exact_source
start = -(-table.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
stop = (table.ctypes.data + table.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
assert stop - start > table.nbytes // 2, "the table is too small to fence off"
if sys.argv[2] == "fenced":
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(start, stop - start, 0) == 0, ctypes.get_errno()  # PROT_NONE
print(model.generate("hello there", max_tokens=6, temperature=0))
print(model.generate("hello there", max_tokens=6, temperature=0.8, top_k=40, seed=3))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fences the mapping with Linux's mprotect")
def test_screened_head_copies_its_few_exact_rows_instead_of_mapping_them(tiny_model: Path) -> None:
    """Lookups and a token's exact rows are copied from the file: each read through the mapping would
    map a whole page-cache folio (2 MB on recent kernels). With the table's pages made unreadable (a
    read there kills the process), greedy and top-k generation still give the same text."""
    runs = {how: subprocess.run([sys.executable, "-c", UNMAPPED_ROWS, str(tiny_model), how], capture_output=True,
                                text=True, timeout=600) for how in ("open", "fenced")}
    assert runs["open"].returncode == 0, runs["open"].stderr[-2000:]
    assert runs["fenced"].returncode == 0, runs["fenced"].stderr[-2000:]
    assert runs["fenced"].stdout == runs["open"].stdout


SHARED_MODEL = """
import sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import edgebit
model = edgebit.load(sys.argv[1], backend="numba", threads=2)
prompts = [[1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11, 12, 13], [14]]
want = [model.logits(p) for p in prompts]
with ThreadPoolExecutor(4) as pool:
    for _ in range(5):
        for got, expected in zip(pool.map(model.logits, prompts), want, strict=True):
            assert np.array_equal(got, expected)
print("ok")
"""


def test_threads_may_share_a_model(tiny_model: Path) -> None:
    """numba's workqueue pool (NUMBA_THREADING_LAYER=workqueue) aborts the process if two threads
    enter it at once; the kernels are launched under a lock, so concurrent callers (an MQTT and an
    HTTP face) just take turns, whatever the threading layer."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    run = subprocess.run([sys.executable, "-c", SHARED_MODEL, str(tiny_model)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_kernel_crossover_is_measured_once_per_machine_and_cached(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to how many tokens the decode kernel runs is timed on this machine once, then read back;
    a damaged cache file is measured again, never trusted."""
    from edgebit.backends.compiled import FEW_TOKENS_CANDIDATES, NumbaBackend

    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path))
    path = tmp_path / "cache" / "crossover.json"
    few = NumbaBackend(threads=1).few_tokens()
    assert few in FEW_TOKENS_CANDIDATES
    cached = json.loads(path.read_text(encoding="utf-8"))
    assert list(cached.values()) == [few] and "threads=1" in next(iter(cached))
    other = next(t for t in FEW_TOKENS_CANDIDATES if t != few)
    path.write_text(json.dumps({next(iter(cached)): other}), encoding="utf-8")
    assert NumbaBackend(threads=1).few_tokens() == other  # read back, not re-measured
    for damaged in ("not json", json.dumps({next(iter(cached)): 1000}), "[]"):
        path.write_text(damaged, encoding="utf-8")
        assert NumbaBackend(threads=1).few_tokens() in FEW_TOKENS_CANDIDATES
        assert json.loads(path.read_text(encoding="utf-8"))[next(iter(cached))] in FEW_TOKENS_CANDIDATES


def test_a_changed_kernel_source_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crossover cache is keyed by the kernels' source: an answer measured for other kernels
    (an older edgebit) is not read back."""
    from edgebit.backends import compiled

    monkeypatch.setenv("EDGEBIT_HOME", str(tmp_path))
    path = tmp_path / "cache" / "crossover.json"
    compiled.NumbaBackend(threads=1).few_tokens()
    key = next(iter(json.loads(path.read_text(encoding="utf-8"))))
    assert key.endswith(f"|kernels={compiled.kernels_fingerprint()}")
    stale = key.replace(compiled.kernels_fingerprint(), "0" * 12)
    other = {stale: compiled.FEW_TOKENS_CANDIDATES[0]}
    path.write_text(json.dumps(other), encoding="utf-8")
    compiled.NumbaBackend(threads=1).few_tokens()
    assert set(json.loads(path.read_text(encoding="utf-8"))) == {stale, key}  # measured anew, beside the old


def test_http_serving_loads_the_full_f16_head() -> None:
    """OpenAI-style requests sample with top_k off, from every logit: the HTTP face loads the f16
    head unless told otherwise; the MQTT node keeps the loader's choice (screened)."""
    from edgebit.cli.serve import head_form

    assert head_form(None, http=True) == "float16"
    assert head_form(None, http=False) is None
    assert head_form("screened", http=True) == "screened"
