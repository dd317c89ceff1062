"""The dropout keep-mask: one definition, used by every kernel and by the tests.

Element (m, k) of the LoRA input x (M, K) is kept when its 16 random bits are at
or above a threshold t = round(p * 2^16):

    call  = Philox4x32-7(key = seed, counter = (k // 8, m, 0, 0))  -> 4 words
    bits  = 16-bit half (k % 2) of word (k % 8) // 2  of that call
    keep  = bits >= t

So one Philox call serves 8 consecutive columns of one row, and the mask is a
pure function of (seed, m, k): any kernel regenerates any element, and nothing
is stored between the forward and the backward. The two counter words hold
the row and the column group separately, so any M * K (beyond 2^31) is covered
with 32-bit arithmetic.

Why these numbers:
- 7 rounds: Salmon et al. ("Parallel random numbers: as easy as 1, 2, 3",
  SC'11) report Philox4x32 passing TestU01's BigCrush from 7 rounds and take
  10 as the default for a safety margin; Triton's default is that 10, which
  costs 10/7 of the integer work. FlashAttention-2's dropout uses 7 rounds.
- 16 bits per element: 8 elements per call (FlashAttention-2 takes 8 bits, 16
  per call, and quantises p to 1/256). With 16 bits p is quantised to 1/65536:
  the effective drop probability is p_eff = t / 65536, within 2^-17 of p
  (t is clamped to 1..65535 for 0 < p < 1, so a small p still drops and
  p < 1 never drops everything).
- The kept values are scaled by 1 / (1 - p_eff), not 1 / (1 - p): the keep
  probability is exactly 1 - p_eff, so E[drop(x)] = x exactly.

A tile of BLOCK_ROWS x BLOCK_COLS (BLOCK_COLS a multiple of 8, starting at a
column that is a multiple of 8) costs BLOCK_ROWS * BLOCK_COLS / 8 Philox calls.
Where it is evaluated: once per element of x in the forward's rank pass, once
per element of dX in the backward GEMM's epilogue, once per element of x in
dA's tn_matmul; never in a GEMM's main loop.
"""
import triton
import triton.language as tl

MASK_BITS = 16
ELEMENTS_PER_CALL = 128 // MASK_BITS
PHILOX_ROUNDS = tl.constexpr(7)  # a constexpr global: read inside the kernels


def dropout_threshold(dropout_p):
    """The integer threshold t of the keep test ``bits >= t``; 0 when p is 0."""
    if dropout_p <= 0.0:
        return 0
    return min((1 << MASK_BITS) - 1, max(1, round(dropout_p * (1 << MASK_BITS))))


def effective_dropout_p(dropout_p):
    """The drop probability the kernels really apply: p quantised to 1/65536."""
    return dropout_threshold(dropout_p) / (1 << MASK_BITS)


def keep_scale(dropout_p):
    """1 / (1 - p_eff): makes E[drop(x)] = x exactly."""
    return 1.0 / (1.0 - effective_dropout_p(dropout_p))


@triton.jit
def _lanes(w0, w1, w2, w3):
    """The 8 16-bit lanes of each call, lane j = half j % 2 of word j // 2, as
    a trailing (2, 2, 2) block indexed [j // 4, (j // 2) % 2, j % 2] (tl.join
    adds its axis last)."""
    low = 0xFFFF
    low_halves = tl.join(tl.join(w0 & low, w2 & low), tl.join(w1 & low, w3 & low))
    high_halves = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    return tl.join(low_halves, high_halves)


@triton.jit
def dropout_keep_tile(seed, rows, col_start, threshold, BLOCK_COLS: tl.constexpr):
    """Boolean keep-mask of shape (len(rows), BLOCK_COLS) for the columns
    col_start .. col_start + BLOCK_COLS - 1 (col_start a multiple of 8)."""
    GROUPS: tl.constexpr = BLOCK_COLS // 8
    groups = col_start // 8 + tl.arange(0, GROUPS)
    c0 = (groups[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + groups[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero, PHILOX_ROUNDS)
    bits = tl.reshape(_lanes(w0, w1, w2, w3), (rows.shape[0], BLOCK_COLS))
    return bits >= threshold.to(tl.uint32)
