"""The tied LM head (logits = x · Eᵀ over the whole vocabulary) in a resident form chosen for the machine.

It reads 328 M embedding values per generated token on the 2B4T, more than any single ternary
matrix, so its form matters as much as the kernels'. numpy's own float16 → float32 cast costs
~2–5 ns per value, too slow to use per token, but the conversion is exact with integer ops:
sign-extend the 16 bits to 32, shift left by 13 and keep the sign and the 15 exponent-and-mantissa
bits — that is the float32 pattern of E·2^-112 (f16 subnormals included), so multiplying x by
2^112 instead gives the float32 product with no float pass over E at all.

Modes:
  float16  exact; resident = the f16 embedding itself (memory-mapped, 2 bytes/value); tiles are
           converted in per-core scratch and multiplied with BLAS. Wins when memory bandwidth is
           the limit (it reads half the bytes of float32).
  float32  exact; a float32 copy (4 bytes/value), plain BLAS; built at load with the same trick.
  int8     approximate, opt-in only: per-row absmax int8 (1 byte/value); logits differ slightly.
  screened exact, with the compiled kernels: an int8 screen (1 byte/value) is resident and the f16
           values stay in the file. `top` finds a token's exact top-k logits from the screen plus
           the exact f16 rows of the few tokens it cannot rule out: half the bytes a token when
           generating (greedy or top-k sampling). Up to FILE_ROWS exact rows (a token's
           candidates, a prompt's lookups) are copied from the file with pread, so no page of the
           f16 table is mapped for them; more rows (full logits) are read through the file
           mapping, whose pages are given back after each call.

The screen's error is bounded, not just small. With s = max|E_v| / 127 and q = rint(E_v / s),
|E_v·x − s·q·x| ≤ s/2·‖x‖₁. The screen multiplies q by int16 activations x̂ = rint(x / σ),
σ = max|x| / M (M ≤ 32767, lowered until 127·‖x̂‖₁ < 2³¹, so the integer sum P = q·x̂ is exact),
and |x_d − σ·x̂_d| ≤ σ·(1/2 + (M+1)·2⁻²⁴), so |s·q·x − s·σ·P| ≤ s·127·D·σ·(1/2 + (M+1)·2⁻²⁴).
Its estimate e_v = P·(s·σ) in float32 is within 3·2⁻²⁴·s·σ·127·‖x̂‖₁ of s·σ·P, and the exact
logit, a float32 sum of D products, within D·2⁻²⁴·127·s·‖x‖₁ of E_v·x whatever order it adds
in. So every exact logit lies within b_v = s·slack of e_v, where
slack = (‖x‖₁·(1/2 + 256·D·2⁻²⁴) + σ·(127·D·(1/2 + (M+1)·2⁻²⁴) + 381·2⁻²⁴·‖x̂‖₁))·(1 + 2⁻¹⁰)
(the last factor covers the rounding of E_v / s, of s·slack, of e_v ± b_v: |e_v| ≲ 127·s·‖x‖₁).
By Cauchy–Schwarz, E_v·x − s·σ·P = (E_v − s·q)·x + s·q·(x − σ·x̂) is also at most
r_v·‖x‖₂ + s·‖q‖₂·‖x − σ·x̂‖₂, with r_v ≥ ‖E_v − s·q‖₂ and ‖q‖₂ kept per row when the screen is
built (`screen_codes`); with the same rounding terms this second bound is ~24 % below the first
for activations without outliers (the random 2B4T's, largest |x| 4.9 RMS), the first much smaller
for a spiky x. Top-k sampling takes the smaller of the two per token (random 2B4T, top 40:
1553–2226 → 705–1025 exact rows, ~5 ms less a token); greedy keeps the first, whose few
candidates are cheap. If L is the k-th largest of e_v − b_v, k tokens have exact logits ≥ L and
every token with e_v + b_v < L has one below L: the top k are among the others, whose exact
logits are then computed as `columns` computes them. A row whose σ would be tiny (σ·s could lose
precision) or whose sums could overflow float32 (a non-finite x included) is not screened: all
its logits are computed.
On the random 2B4T-shaped model 20–220 tokens of 128 256 remain.

The exact forms give the same bits, whatever the lane count: BLAS's summation order depends on
the shape of each call, so every form multiplies x by the same tiles of vocabulary rows, fixed by
the shapes alone (`call_rows`), and lanes take whole tiles. Which form the machine and backend
choose (`select.choose_lm_head`) therefore never changes a logit.

With the compiled kernels installed (`fast.kernels()`), the exact modes go through numba's
`head_f16` / `head_f32`, which read the embedding as it is in the file (f16 widened exactly as it
is loaded) and compute every logit with the same per-row loop: the modes give identical logits,
and a row's logits do not depend on how many rows share the call (prompt chunking) or on the
ternary backend. BLAS would be faster for long batches (perplexity), but its summation order
depends on the call's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .fast import kernels, read_only
from .memory import release_file_pages
from .threads import Workers

MODES = ("float16", "float32", "int8", "screened")
TILE = 128 * 1024  # embedding values per tile (512 KB of float32 scratch for a converted tile)
PROMPT_TILE = 1 << 20  # values per tile from PROMPT_ROWS rows of x on: BLAS needs bigger calls there
PROMPT_ROWS = 8
MIN_SPLIT = 1 << 22  # values per lane below which the head is not split (small products stay one BLAS call)
# Exact rows up to which the screened head copies them from the file (~3 µs a row here) rather than
# reading them through the mapping, which maps a whole page-cache folio (up to 2 MB) for each: for
# top-k 40's ~1700 rows a token on the 2B4T that was as fast, and 0.5 GiB less at the peak.
FILE_ROWS = 8192
_KEEP = np.int32(-(2**31) | 0x0FFFE000)  # sign bit + the 15 exponent/mantissa bits after the shift
_UNSCALE = np.float32(2.0**112)
_SAFE_X = 2.0**15  # |x|·2^112 stays finite below this
SCREEN_LEVELS = 32767  # the screen's activations are int16: |x̂| ≤ this
SMALLEST_STEP = 2.0**-60  # below this σ a row is not screened: s·σ stays a normal float32 (s ≥ 2⁻³¹)


@dataclass(frozen=True)
class _Slack:
    """What one row x contributes to the screen's bounds on |exact logit − estimate| (module note):
    b_v = min(scale_v·l1, (residual_v·x_norm + scale_v·(code_norm_v·miss_norm + rounding))·(1 + 2⁻¹⁰))."""

    l1: np.float32
    x_norm: np.float32  # ≥ ‖x‖₂
    miss_norm: np.float32  # ≥ ‖x − σ·x̂‖₂
    rounding: np.float32  # the float32 roundings of the exact logit and of the estimate, over s


@dataclass(frozen=True)
class TopK:
    """What a sampler needs from a row of logits: the exact values of its `k` largest, and of the
    tokens in `include` (those a repetition penalty will change), the rest may be -inf."""

    k: int
    include: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"TopK needs k >= 1, not {self.k}")


def _f16_bits_to_scaled_f32(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """f16 values (int16 view) → their float32 value × 2^-112, exactly, as int32 bits in `out`."""
    np.left_shift(src, 13, out=out, dtype=np.int32)  # int16 → int32 sign-extends first
    np.bitwise_and(out, _KEEP, out=out)
    return out


def f16_to_f32(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Exact float16 → float32 conversion into `out` (same shape), several times faster than astype."""
    bits = out.view(np.int32)
    _f16_bits_to_scaled_f32(src.view(np.int16), bits)
    np.multiply(out, _UNSCALE, out=out)
    return out


class LMHead:
    """logits = x · Eᵀ for a (vocab, dim) embedding E (float16 or float32), split over the cores."""

    def __init__(self, embedding: np.ndarray, mode: str = "float16", threads: int | None = None,
                 file_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """file_rows(ids): the embedding's rows `ids` copied from the model file (`GGUFFile.tensor_rows`),
        which the screened head reads instead of the file mapping where it needs only a few."""
        if mode not in MODES:
            raise ValueError(f"LM head mode must be one of {MODES}, not {mode!r}")
        if embedding.ndim != 2 or embedding.dtype not in (np.float16, np.float32):
            raise ValueError(f"the embedding must be a 2-D float16 or float32 array, got {embedding.dtype} "
                             f"{embedding.shape}")
        if mode in ("float16", "screened") and embedding.dtype == np.float32:
            mode = "float32"  # rounding a float32 embedding to f16 would change the logits
        self._fast = kernels() if mode != "int8" else None  # the compiled head serves the exact modes
        if mode == "screened" and self._fast is None:
            mode = "float16"  # the screen is built and read by the compiled kernels
        self.mode = mode
        self.shape = embedding.shape
        self._file_rows = file_rows if mode == "screened" else None
        self.workers = Workers(threads)
        self._scratch: dict[int, np.ndarray] = {}
        self.row_scale: np.ndarray | None = None
        # What the compiled kernel reads in the exact modes: the embedding's values as in the file.
        self.exact_source = read_only(embedding.view(np.int16) if embedding.dtype == np.float16 else embedding)
        if self._fast is not None and mode != "screened" and embedding.dtype == np.float16:
            self.exact_source = self._anonymous_copy(self.exact_source)
        # The table to look tokens up in: the copy when there is one, since a lookup through the file
        # mapping faults in whole page-cache folios (up to 2 MB each on recent kernels), which grew
        # the resident set by 200 MB over one random 128-token prompt here (`lookup` copies the rows
        # from the file when it can, else gives the pages back).
        self.embedding = self.exact_source.view(embedding.dtype)
        if mode == "float16":
            self.weight = embedding.view(np.int16)
        elif mode == "float32":  # the compiled head never reads a float32 copy: only BLAS needs one
            convert = embedding.dtype != np.float32 and self._fast is None
            self.weight = self._convert(embedding) if convert else self.exact_source
        elif mode == "int8":
            self.weight, self.row_scale = self._quantize(embedding)
        else:
            self.screen, self.screen_scale, self.screen_residual, self.screen_code_norm = self._build_screen()
            self._largest_scale = float(self.screen_scale[np.isfinite(self.screen_scale)].max(initial=0))

    @staticmethod
    def resident_bytes(mode: str, shape: tuple[int, int]) -> int:
        """Memory the head keeps for a (vocab, dim) embedding in `mode` (float16: the file's own pages)."""
        vocab, dim = shape
        per_value = {"float16": 2, "float32": 4, "int8": 1, "screened": 1}[mode]
        per_row = {"int8": 4, "screened": 12}.get(mode, 0)  # float32 scales (and the screen's two norms)
        return vocab * (dim * per_value + per_row)

    def call_rows(self, tokens: int) -> int:
        """Vocabulary rows per BLAS call for `tokens` rows of x, the same in every mode and for any lane count."""
        return max((PROMPT_TILE if tokens >= PROMPT_ROWS else TILE) // self.shape[1], 1)

    def _tiles(self, fn, rows: int) -> None:
        """Run fn(lane, start, stop) over the tiles [i·rows, (i+1)·rows) of the vocabulary; each lane
        takes whole tiles, so the tiles do not depend on the number of lanes."""
        vocab, dim = self.shape

        def lane(index: int, start: int, stop: int) -> None:
            for r in range(start, stop, rows):
                fn(index, r, min(r + rows, stop))

        self.workers.run(lane, vocab, align=rows, min_rows=max(MIN_SPLIT // dim, 1))

    def _lane_buffer(self, lane: int, size: int) -> np.ndarray:
        buf = self._scratch.get(lane)
        if buf is None or buf.size < size:
            buf = self._scratch[lane] = np.empty(size, dtype=np.float32)
        return buf[:size]

    def _convert(self, embedding: np.ndarray) -> np.ndarray:
        """float32 copy of an f16 embedding, giving back the file pages as it goes."""
        out = np.empty(self.shape, dtype=np.float32)

        def convert(lane: int, start: int, stop: int) -> None:
            f16_to_f32(embedding[start:stop], out[start:stop])
            release_file_pages(embedding[start:stop])

        self._tiles(convert, rows=max((1 << 22) // self.shape[1], 1))
        return out

    @staticmethod
    def _anonymous_copy(bits: np.ndarray) -> np.ndarray:
        """The f16 embedding (as int16 bits) copied out of the file mapping, giving back the file pages
        as it goes (resident memory stays one copy). numpy backs large arrays with huge pages, and
        the head reads all 657 MB of the 2B4T's embedding per token: through the mapping's 4 KB pages
        the compiled head took 42 ms a token on two cores here, from the copy 29 ms."""
        out = np.empty(bits.shape, dtype=np.int16)
        step = max((1 << 24) // max(bits.shape[1], 1), 1)
        for start in range(0, bits.shape[0], step):
            out[start : start + step] = bits[start : start + step]
            release_file_pages(bits[start : start + step])
        out.flags.writeable = False
        return out

    def _quantize(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row absmax int8 codes and scales (the approximate mode)."""
        codes = np.empty(self.shape, dtype=np.int8)
        scale = np.empty(self.shape[0], dtype=np.float32)

        def quantize(lane: int, start: int, stop: int) -> None:
            rows = embedding[start:stop].astype(np.float32)
            s = np.abs(rows).max(axis=1) / np.float32(127)
            s[s == 0] = 1
            scale[start:stop] = s
            np.rint(rows / s[:, None], out=rows)
            codes[start:stop] = rows
            release_file_pages(embedding[start:stop])

        self._tiles(quantize, rows=max((1 << 20) // self.shape[1], 1))
        return codes, scale

    def _build_screen(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The int8 screen's codes, row scales and the two row norms of its second bound
        (`numba_kernels.screen_codes`), built from the file's f16 rows in slices whose pages are
        given back as it goes (the resident set never holds the f16 table)."""
        codes = np.empty(self.shape, dtype=np.int8)
        scale, residual, code_norm = (np.empty(self.shape[0], dtype=np.float32) for _ in range(3))
        with self._fast.launch(self.workers.threads):
            for start, rows in self._file_slices():
                stop = start + rows.shape[0]
                self._fast.screen_codes(rows, codes[start:stop], scale[start:stop], residual[start:stop],
                                        code_norm[start:stop])
        return read_only(codes), scale, residual, code_norm

    def _file_slices(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) over `exact_source` in 16 MB slices, each slice's file pages given back
        once the caller is done with it (and the pages two slices share, at the end)."""
        step = max((1 << 24) // max(self.exact_source[0].nbytes, 1), 1)
        for start in range(0, self.shape[0], step):
            rows = self.exact_source[start : start + step]
            yield start, rows
            release_file_pages(rows)
        release_file_pages(self.exact_source)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 embedding rows of the tokens `ids` (the model's input), exactly."""
        if self._file_rows is not None:
            unique, where = np.unique(ids, return_inverse=True)
            return self._file_rows(unique).astype(np.float32)[where.reshape(np.shape(ids))]
        rows = self.embedding[ids].astype(np.float32)
        if self.mode == "screened":
            release_file_pages(self.exact_source)
        return rows

    def _compiled(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Logits of rows x against `weight` (rows of `exact_source`) with the compiled kernels."""
        weight = read_only(weight)
        out = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
        with self._fast.launch(self.workers.threads):
            if weight.dtype == np.int16:
                self._fast.head_f16(weight, x, out)
            else:
                self._fast.head_f32(weight, x, out)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 logits (T, vocab) of float32 rows x (T, dim)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        if self.mode == "screened":  # slice by slice, each given back: the f16 table is never resident
            for start, rows in self._file_slices():
                out[:, start : start + rows.shape[0]] = self._compiled(x, rows)
            return out
        if self._fast is not None:
            return self._compiled(x, self.exact_source)
        rows = self.call_rows(x.shape[0])
        if self.mode == "float32":
            self._tiles(lambda lane, a, b: np.matmul(x, self.weight[a:b].T, out=out[:, a:b]), rows)
            return out
        scaled = self.mode == "float16" and float(np.abs(x).max(initial=0)) < _SAFE_X
        xs = x * _UNSCALE if scaled else x
        dim = self.shape[1]

        def tile(lane: int, a: int, b: int) -> None:
            buf = self._lane_buffer(lane, (b - a) * dim).reshape(b - a, dim)
            if self.mode == "int8":
                np.copyto(buf, self.weight[a:b], casting="unsafe")
            elif scaled:
                _f16_bits_to_scaled_f32(self.weight[a:b], buf.view(np.int32))
            else:
                f16_to_f32(self.weight[a:b], buf)
            np.matmul(xs, buf.T, out=out[:, a:b])

        self._tiles(tile, rows)
        if self.row_scale is not None:
            out *= self.row_scale
        return out

    def columns(self, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """float32 logits (T, len(ids)) of rows x for the vocabulary entries `ids` only: the matching
        columns of `self(x)` up to float32 rounding (another call shape sums in another order), the
        same bits in every mode (used where only a few tokens are scored)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.intp)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"vocabulary ids must be in 0..{self.shape[0] - 1}")
        if self._file_rows is not None and ids.size <= FILE_ROWS:  # copied, never mapped
            return self._compiled(x, self._file_rows(ids).view(np.int16))
        if self._fast is not None and self.exact_source.dtype == np.int16:  # the rows read where they lie
            out = np.empty((x.shape[0], ids.size), dtype=np.float32)
            with self._fast.launch(self.workers.threads):
                self._fast.head_f16_rows(self.exact_source, ids, x, out)
            if self.mode == "screened":
                release_file_pages(self.exact_source)
            return out
        if self._fast is not None:
            return self._compiled(x, self.exact_source[ids])
        if self.mode == "float16":
            rows = f16_to_f32(self.weight[ids], np.empty((ids.size, self.shape[1]), dtype=np.float32))
        else:
            rows = self.weight[ids].astype(np.float32, copy=False)
        out = x @ rows.T
        if self.row_scale is not None:
            out *= self.row_scale[ids]
        return out

    def top(self, x: np.ndarray, wants: Sequence[TopK]) -> np.ndarray:
        """float32 logits (T, vocab) of rows x where row t holds the exact logits of its wants[t].k
        largest entries and of wants[t].include, -inf elsewhere; exactly `self(x)` at those entries
        (`columns`' bits). Without a screen, the full logits."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.mode != "screened":
            return self(x)
        xq, sigma, slacks = self._screen_activations(x)
        estimate = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        with self._fast.launch(self.workers.threads):
            self._fast.head_i8(self.screen, self.screen_scale, xq, sigma, estimate)
        out = np.full_like(estimate, -np.inf)
        for t, want in enumerate(wants):
            ids = self._candidates(estimate[t], slacks[t], want)
            out[t, ids] = self.columns(x[t : t + 1], ids)[0]
        return out

    def _screen_activations(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[_Slack | None]]:
        """The screen's int16 activations x̂ = rint(x / σ) of rows x, σ per row, and what each row
        contributes to the bounds (see the module's note); None for a row the screen cannot bound
        (x̂ 0, σ 1)."""
        xq, sigma = np.zeros(x.shape, dtype=np.int16), np.ones(x.shape[0], dtype=np.float32)
        slacks: list[_Slack | None] = []
        for t, row in enumerate(x):
            screened = self._screen_row(row)
            if screened is not None:
                xq[t], sigma[t] = screened[0], screened[1]
            slacks.append(None if screened is None else screened[2])
        return xq, sigma, slacks

    def _screen_row(self, row: np.ndarray) -> tuple[np.ndarray, np.float32, _Slack] | None:
        """x̂ (as float values), σ and the bounds' terms for one row of x, or None where the screen
        cannot bound it: its sums (≤ 127·‖x‖₁) or scaled estimates and bounds could overflow float32
        (a non-finite x included), or σ would be below SMALLEST_STEP."""
        magnitude = np.abs(row)
        norm = float(magnitude.sum(dtype=np.float64))
        if not norm * 127 * max(self._largest_scale * 2, 1) < 1e38:
            return None
        levels, largest = SCREEN_LEVELS, float(magnitude.max())
        while True:  # M = levels, lowered until the integer sums cannot overflow int32
            step = np.float32(largest / levels) if levels >= 1 else np.float32(0)
            if not step >= SMALLEST_STEP:
                return None
            codes = np.rint(row / step)
            total = int(np.abs(codes).sum(dtype=np.float64))  # an exact integer: < D·2¹⁵ ≤ 2⁵³
            if 127 * total < 2**31:
                break
            levels = min(levels - 1, levels * (2**31 - 1) // (127 * total))
        dim, up = row.size, 1 + 2.0**-20  # `up` covers a float64 sum of D squares, its root, a float32 rounding
        wide = row.astype(np.float64)
        miss = wide - float(step) * codes.astype(np.float64)  # σ·x̂ is exact in float64
        rounding = norm * 256 * dim * 2.0**-24 + 381 * 2.0**-24 * float(step) * total
        l1 = norm / 2 + rounding + float(step) * 127 * dim * (0.5 + (levels + 1) * 2.0**-24)
        return codes, step, _Slack(np.float32(l1 * (1 + 2.0**-10)), np.float32(np.sqrt(wide @ wide) * up),
                                   np.float32(np.sqrt(miss @ miss) * up), np.float32(rounding * up))

    def _candidates(self, estimate: np.ndarray, slack: _Slack | None, want: TopK) -> np.ndarray:
        """Tokens whose exact logit may be among the `want.k` largest (see the module's note), given
        the screen's estimates and what x contributes to their bounds, plus `want.include` and every
        row the screen cannot bound (non-finite values)."""
        include = np.unique(np.asarray(want.include, dtype=np.intp))
        if slack is None or want.k >= self.shape[0] - include.size:
            return np.arange(self.shape[0])
        if want.k == 1:  # the common case (greedy), compiled: two passes instead of numpy's eight
            return self._fast.screen_top1(read_only(estimate), self.screen_scale, slack.l1, include)
        # the smaller of the two bounds per row (the second halves top-k's candidates on the random 2B4T)
        bound = self.screen_scale * slack.l1
        second = self.screen_residual * slack.x_norm
        second += self.screen_scale * (self.screen_code_norm * slack.miss_norm + slack.rounding)
        second *= np.float32(1 + 2.0**-10)
        np.minimum(bound, second, out=bound)
        low = estimate - bound
        low[np.isnan(low)] = -np.inf
        low[include] = -np.inf  # their values change after this (a penalty): they do not compete
        floor = np.partition(low, low.size - want.k)[low.size - want.k]
        keep = ~(estimate + bound < floor)  # NaN (a row the screen cannot bound) is kept
        keep[include] = True
        return np.flatnonzero(keep)
