"""Every .cu source compiles with the machine's nvcc for sm_80 and sm_90, without a warning.

Runs in CI without a GPU: nvcc only translates. Checked per source and architecture:
  - `nvcc -ptx` of the file as written (its #include of common.cuh resolved by nvcc), warnings as errors;
  - the same for the self-contained text loader.py hands to NVRTC at run time (preamble pasted in);
  - the PTX defines exactly the kernels loader.KERNELS registers, as NAME_f32 and NAME_f64;
  - `nvcc -cubin` runs ptxas: no register spills, and every kernel fits its largest launch block in
    the register file (launch.fits_registers).
NVRTC (CuPy's binding) also compiles the runtime text when its library is installed.
Skipped, with the reason, when nvcc (or NVRTC) is not installed.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from disttrain.kernels_cuda import launch_config as launch, loader

ARCHS = ("sm_80", "sm_90")
FLAGS = ("--std=c++17", "-Werror", "all-warnings")


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda): "
                                                     "install the CUDA toolkit to compile the kernels")
SOURCES = loader.sources()


def _nvcc(args, cwd):
    result = subprocess.run([NVCC, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def _ptx(path, arch, out_dir):
    out = Path(out_dir) / f"{Path(path).stem}.{arch}.ptx"
    code, log = _nvcc(["-ptx", f"-arch={arch}", *FLAGS, "-o", str(out), str(path)], cwd=Path(path).parent)
    assert code == 0, f"nvcc -ptx -arch={arch} {Path(path).name} failed:\n{log}"
    assert "warning" not in log.lower(), f"nvcc -ptx -arch={arch} {Path(path).name} warned:\n{log}"
    return out.read_text()


def _entries(ptx):
    return set(re.findall(r"\.entry\s+(\w+)\s*\(", ptx))


def _expected_entries(source):
    names = {f"{name}_{suffix}" for name in loader.KERNELS[source] for suffix in loader.SUFFIX.values()}
    return names | set(loader.UNTYPED_KERNELS.get(source, ()))


def test_every_source_is_registered_in_the_loader():
    assert set(SOURCES) == set(loader.KERNELS), "a .cu file without a loader.KERNELS entry (or the reverse)"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_source_compiles_to_ptx_without_warnings(source, arch, tmp_path):
    ptx = _ptx(loader.SOURCE_DIR / f"{source}.cu", arch, tmp_path)
    assert _entries(ptx) == _expected_entries(source)


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES)
def test_the_text_nvrtc_compiles_is_self_contained(source, tmp_path):
    code = loader.source_text(source)
    assert not re.search(r"^\s*#\s*include", code, re.M), "NVRTC has no system headers and gets no include path"
    path = tmp_path / f"{source}_assembled.cu"
    path.write_text(code)
    ptx = _ptx(path, "sm_90", tmp_path)
    assert _entries(ptx) == _expected_entries(source)


_PROPS = re.compile(r"Function properties for (\w+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads")
_REGS = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'\s*\n.*?Used (\d+) registers", re.S)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_ptxas_no_spills_and_registers_fit_the_launch_blocks(source, arch, tmp_path):
    out = tmp_path / f"{source}.cubin"
    code, log = _nvcc(["-cubin", f"-arch={arch}", *FLAGS, "-Xptxas", "-v,--warn-on-spills,--warning-as-error",
                       "-o", str(out), f"{source}.cu"], cwd=loader.SOURCE_DIR)
    assert code == 0, f"nvcc -cubin -arch={arch} {source}.cu failed (ptxas warnings are errors here):\n{log}"
    for name, stack, spill_st, spill_ld in _PROPS.findall(log):
        assert (int(spill_st), int(spill_ld)) == (0, 0), f"{name} spills registers on {arch}:\n{log}"
    registers = {name: int(regs) for name, _, regs in _REGS.findall(log)}
    assert set(registers) == _expected_entries(source), log
    for name, regs in registers.items():
        block = launch.MAX_BLOCK if name.startswith("xent_forward") else launch.BLOCK
        assert launch.fits_registers(regs, block), f"{name}: {regs} registers/thread do not fit {block} threads"


@needs_nvcc
def test_warnings_do_fail_the_build(tmp_path):
    """The flags above turn a warning into a failure (so a clean compile means no warning)."""
    bad = tmp_path / "bad.cu"
    bad.write_text('#warning "deliberate"\nextern "C" __global__ void k(float* x) { x[0] = 1.0f; }\n')
    code, log = _nvcc(["-ptx", "-arch=sm_80", *FLAGS, "-o", str(tmp_path / "bad.ptx"), str(bad)], cwd=tmp_path)
    assert code != 0, log


def _nvrtc_or_none():
    """CuPy's NVRTC binding when CuPy and an NVRTC library are installed (no GPU needed to compile)."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception:  # ImportError, or the library is missing: RuntimeError / OSError from the loader
        return None


NVRTC = _nvrtc_or_none()


@pytest.mark.skipif(NVRTC is None, reason="CuPy's NVRTC library not found (pip install nvidia-cuda-nvrtc-cu12, "
                                          "or cupy-cuda12x[ctk])")
@pytest.mark.parametrize("arch", ("80", "90"))
@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_the_runtime_text(source, arch):
    """The exact code and options RawModule compiles at run time (CuPy adds the arch and
    --device-as-default-execution-space), through NVRTC itself: no system headers to lean on."""
    prog = NVRTC.createProgram(loader.source_text(source), f"{source}.cu", (), ())
    try:
        try:
            options = loader.OPTIONS + (f"-arch=compute_{arch}", "--device-as-default-execution-space")
            NVRTC.compileProgram(prog, options)
        except NVRTC.NVRTCError as exc:
            pytest.fail(f"NVRTC failed on {source}.cu for compute_{arch}: {exc}\n{NVRTC.getProgramLog(prog)}")
        log = NVRTC.getProgramLog(prog)
        ptx = NVRTC.getPTX(prog)
    finally:
        NVRTC.destroyProgram(prog)
    log = log.decode() if isinstance(log, bytes) else log
    assert "warning" not in log.lower(), log
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    assert _entries(ptx.rstrip("\x00")) == _expected_entries(source)
