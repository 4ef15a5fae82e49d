"""Launch-configuration helpers (pure Python): every configuration is legal for CUDA, covers the work
with the grid-stride loops, and agrees with the block sizes the kernels are compiled for."""
import re

import pytest

from disttrain.kernels_cuda import launch_config as launch, loader

SIZES = [1, 2, 31, 32, 33, 255, 256, 257, 1000, 4096, 10_000, 65_535 * 256 + 1, 10 ** 9]


def _legal(grid, block):
    assert all(isinstance(g, int) and g >= 1 for g in grid)
    assert len(block) == 1 and block[0] % launch.WARP == 0 and 0 < block[0] <= launch.MAX_BLOCK
    assert grid[0] <= launch.MAX_GRID_X
    if len(grid) > 1:
        assert grid[1] <= launch.MAX_GRID_Y


def test_constants_match_the_kernels_preamble():
    text = (loader.SOURCE_DIR / loader.PREAMBLE).read_text()
    defines = dict(re.findall(r"#define (DT_\w+) (\d+)", text))
    assert int(defines["DT_BLOCK"]) == launch.BLOCK
    assert int(defines["DT_MAX_BLOCK"]) == launch.MAX_BLOCK
    assert int(defines["DT_WARP"]) == launch.WARP


@pytest.mark.parametrize("n", SIZES)
def test_elementwise_config_covers_n_without_idle_blocks(n):
    grid, block = launch.elementwise_config(n)
    _legal(grid, block)
    assert grid[0] == min(-(-n // block[0]), launch.GRID_CAP)
    assert (grid[0] - 1) * block[0] < n  # the last block has work


@pytest.mark.parametrize("n_rows", [1, 7, 400, 65_535, 65_536, 200_000])
@pytest.mark.parametrize("n_cols", [1, 31, 32, 33, 200, 256, 257, 10_000])
def test_rows_config(n_rows, n_cols):
    grid, block = launch.rows_config(n_rows, n_cols)
    _legal(grid, block)
    assert block[0] == min(launch.BLOCK, -(-n_cols // 32) * 32)  # narrow rows: a narrower block
    assert grid[1] == min(n_rows, launch.MAX_GRID_Y)
    assert grid[0] * block[0] >= n_cols or grid[0] == launch.GRID_CAP
    assert (grid[0] - 1) * block[0] < n_cols


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("n_cols", [1, 2, 33, 1000, 1024])
def test_softmax_narrow_rows_get_a_warp_each(n_cols, itemsize):
    cfg = launch.softmax_config(400, n_cols, itemsize)
    assert cfg.kind == "warp" and cfg.shared_mem == 0
    assert cfg.block == (launch.WARP_ROWS_BLOCK,) and cfg.rows_per_block == launch.WARP_ROWS_BLOCK // launch.WARP
    assert cfg.grid == (100,)  # 400 rows, 4 per block
    _legal(cfg.grid, cfg.block)


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("n_cols, threads", [(1025, 256), (2048, 256), (2049, 512), (10_000, 1024),
                                             (50_000, 1024), (10 ** 6, 1024)])
def test_softmax_wide_rows_get_a_block_each(n_cols, threads, itemsize):
    cfg = launch.softmax_config(400, n_cols, itemsize)
    assert cfg.kind == "block" and cfg.rows_per_block == 1 and cfg.grid == (400,)
    assert cfg.block == (threads,)
    assert threads & (threads - 1) == 0 and 64 <= threads <= launch.MAX_BLOCK
    assert cfg.shared_mem == 2 * (threads // 32) * itemsize  # (max, sum) per warp
    assert cfg.shared_mem <= 48 * 1024  # no opt-in needed for dynamic shared memory
    _legal(cfg.grid, cfg.block)


def test_softmax_many_rows_cap_the_grid():
    assert launch.softmax_config(10 ** 7, 10_000, 4).grid == (launch.GRID_CAP,)
    assert launch.softmax_config(10 ** 7, 10, 4).grid == (launch.GRID_CAP,)


@pytest.mark.parametrize("n", SIZES)
def test_reduction_config_caps_the_atomics(n):
    grid, block = launch.reduction_config(n)
    _legal(grid, block)
    assert block == (launch.BLOCK,)  # norms.cu sizes its scratch for DT_BLOCK threads
    assert 1 <= grid[0] <= launch.REDUCTION_GRID_CAP


@pytest.mark.parametrize("n_rows", SIZES)
def test_warp_rows_config_gives_each_row_a_warp(n_rows):
    grid, block = launch.warp_rows_config(n_rows)
    _legal(grid, block)
    rows_per_block = block[0] // launch.WARP
    assert grid[0] == min(launch.ceil_div(n_rows, rows_per_block), launch.GRID_CAP)


@pytest.mark.parametrize("bad", [
    lambda: launch.elementwise_config(0), lambda: launch.elementwise_config(-1),
    lambda: launch.elementwise_config(2.5), lambda: launch.elementwise_config(10, block=100),
    lambda: launch.elementwise_config(10, block=2048), lambda: launch.rows_config(0, 5),
    lambda: launch.rows_config(5, 0), lambda: launch.softmax_config(4, 0, 4),
    lambda: launch.softmax_config(4, 4, 2), lambda: launch.reduction_config(0), lambda: launch.warp_rows_config(0)])
def test_bad_requests_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_helpers():
    assert [launch.next_pow2(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 2, 4, 64, 128, 1024]
    assert launch.ceil_div(10, 3) == 4 and launch.ceil_div(9, 3) == 3 and launch.ceil_div(0, 3) == 0
    with pytest.raises(ValueError):
        launch.ceil_div(1, 0)
    assert launch.fits_registers(64, 1024) and not launch.fits_registers(65, 1024)
    assert launch.fits_registers(255, 256) and not launch.fits_registers(256, 257)
    assert launch.fits_registers(57, 1024)  # rounds up to 64 per thread: exactly the limit
