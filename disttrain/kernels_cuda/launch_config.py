"""Launch configurations for the kernels: pure Python, no CuPy, tested on the CPU.

Every kernel loops grid-stride, so any grid is correct; these helpers pick one that fills the GPU
without launching blocks that would find no work. Block sizes match the `__launch_bounds__` the
kernels are compiled with (common.cuh: DT_BLOCK, DT_MAX_BLOCK; a CPU test checks the numbers agree).

    elementwise_config(n)             1-D: (grid,), (block,)
    rows_config(n_rows, n_cols)       2-D: rows on grid y, columns on grid x
    softmax_config(n_rows, n_cols, itemsize)
                                      a warp per row (narrow rows) or a block per row (wide rows),
                                      with the block size and dynamic shared memory of the choice
    reduction_config(n)               1-D with a capped grid: one atomic per block
    warp_rows_config(n_rows)          a warp per row (any width), WARP_ROWS_BLOCK threads per block
"""
from dataclasses import dataclass

WARP = 32
BLOCK = 256                 # common.cuh DT_BLOCK
MAX_BLOCK = 1024            # common.cuh DT_MAX_BLOCK
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_Y = 65535
GRID_CAP = 65535            # blocks of a 1-D grid-stride launch (more buys nothing: each thread loops)
REDUCTION_GRID_CAP = 1024   # blocks of a reduction: one atomicAdd per block into the accumulator
WARP_ROW_MAX_COLS = 1024    # rows up to this wide get a warp each (<= 32 values per lane)
WARP_ROWS_BLOCK = 128       # block size of the warp-per-row shape: 4 rows per block
ITEMS_PER_THREAD = 8        # block-per-row shape: aim for at least this many columns per thread


def ceil_div(a, b):
    if b <= 0:
        raise ValueError(f"ceil_div: divisor must be positive, got {b}")
    return -(-a // b)


def next_pow2(n):
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _check_count(name, n):
    if int(n) != n or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")


def elementwise_config(n, block=BLOCK, cap=GRID_CAP):
    """(grid, block) 1-tuples for a grid-stride loop over n >= 1 elements."""
    _check_count("n", n)
    if n == 0:
        raise ValueError("elementwise_config: nothing to launch for n = 0 (the wrapper returns early)")
    check_block(block)
    return (min(ceil_div(n, block), cap),), (block,)


def rows_config(n_rows, n_cols, block=BLOCK):
    """(grid, block) for kernels with rows on blockIdx.y and columns on blockIdx.x.

    A narrow row gets a narrower block (a multiple of the warp size, at least one warp) so that
    fewer threads idle; grid.y is capped at CUDA's 65535 (the kernels loop over rows).
    """
    _check_count("n_rows", n_rows)
    _check_count("n_cols", n_cols)
    if n_rows == 0 or n_cols == 0:
        raise ValueError(f"rows_config: nothing to launch for shape ({n_rows}, {n_cols})")
    check_block(block)
    threads = min(block, ceil_div(n_cols, WARP) * WARP)
    grid_x = min(ceil_div(n_cols, threads), GRID_CAP)
    grid_y = min(n_rows, MAX_GRID_Y)
    return (grid_x, grid_y), (threads,)


@dataclass(frozen=True)
class SoftmaxLaunch:
    """How a row-wise softmax / cross-entropy forward runs: kernel shape, grid, block, shared memory."""

    kind: str              # "warp": a warp per row; "block": a block per row
    grid: tuple
    block: tuple
    shared_mem: int        # bytes of dynamic shared memory
    rows_per_block: int


def softmax_config(n_rows, n_cols, itemsize):
    """The launch of a row-wise reduction (log-sum-exp) over n_rows rows of n_cols values.

    Narrow rows (n_cols <= WARP_ROW_MAX_COLS): a warp per row, WARP_ROWS_BLOCK threads per block,
    shuffles only (no shared memory). Wide rows: a block per row of a power-of-two size between 64
    and MAX_BLOCK giving each thread about ITEMS_PER_THREAD columns, with 2 values of `itemsize`
    bytes per warp of shared memory (the (max, sum) pairs of the block reduction).
    """
    _check_count("n_rows", n_rows)
    _check_count("n_cols", n_cols)
    if itemsize not in (4, 8):
        raise ValueError(f"softmax_config: itemsize must be 4 (float32) or 8 (float64), got {itemsize}")
    if n_rows == 0 or n_cols == 0:
        raise ValueError(f"softmax_config: nothing to launch for shape ({n_rows}, {n_cols})")
    if n_cols <= WARP_ROW_MAX_COLS:
        rows_per_block = WARP_ROWS_BLOCK // WARP
        grid = min(ceil_div(n_rows, rows_per_block), GRID_CAP)
        return SoftmaxLaunch("warp", (grid,), (WARP_ROWS_BLOCK,), 0, rows_per_block)
    threads = max(64, min(MAX_BLOCK, next_pow2(ceil_div(n_cols, ITEMS_PER_THREAD))))
    return SoftmaxLaunch("block", (min(n_rows, GRID_CAP),), (threads,), 2 * (threads // WARP) * itemsize, 1)


def reduction_config(n, block=BLOCK):
    """(grid, block) for a grid-stride reduction over n >= 1 values with one atomic per block."""
    _check_count("n", n)
    if n == 0:
        raise ValueError("reduction_config: nothing to launch for n = 0")
    check_block(block)
    return (min(ceil_div(n, block * 4), REDUCTION_GRID_CAP),), (block,)


def check_block(block):
    """A block size the kernels accept: a multiple of the warp size, at most MAX_BLOCK."""
    if block <= 0 or block % WARP or block > MAX_BLOCK:
        raise ValueError(f"block size must be a positive multiple of {WARP} up to {MAX_BLOCK}, got {block}")
    return block


def fits_registers(registers_per_thread, block, registers_per_block=65536):
    """True when a block of `block` threads fits the register file (64K registers per block on sm_80/90).

    Register allocation is per warp in units of 256 registers (8 per thread, rounded up).
    """
    per_thread = ceil_div(max(registers_per_thread, 1), 8) * 8
    warps = ceil_div(block, WARP)
    return warps * WARP * per_thread <= registers_per_block


def warp_rows_config(n_rows):
    """(grid, block) for kernels that give each of n_rows >= 1 rows a warp (DT_FOR_EACH_WARP_ROW)."""
    _check_count("n_rows", n_rows)
    if n_rows == 0:
        raise ValueError("warp_rows_config: nothing to launch for 0 rows")
    return (min(ceil_div(n_rows, WARP_ROWS_BLOCK // WARP), GRID_CAP),), (WARP_ROWS_BLOCK,)
