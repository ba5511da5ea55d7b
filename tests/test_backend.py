"""The Linux BLAS fix never loads an OpenBLAS whose kernels this CPU cannot run."""

import pytest

from mlx_distill import backend


class _FakeOpenBLAS:
    """Stands in for a ctypes.CDLL: only `openblas_get_config` is read before loading."""

    def __init__(self, config: bytes):
        self.openblas_get_config = lambda: config


@pytest.mark.parametrize(
    ("config", "flags", "usable"),
    [
        (b"OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4", {"avx2", "fma"}, False),
        (b"OpenBLAS 0.3.31 NO_AFFINITY SKYLAKEX MAX_THREADS=4", {"avx2", "avx512f"}, True),
        (b"OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Zen MAX_THREADS=64", {"avx2"}, True),
        (b"OpenBLAS 0.3.26 NO_AFFINITY HASWELL MAX_THREADS=8", {"avx2"}, True),
        (b"OpenBLAS 0.3.26 NO_AFFINITY COOPERLAKE MAX_THREADS=8", {"sse2"}, False),
    ],
)
def test_single_target_avx512_builds_are_refused_without_avx512(monkeypatch, config, flags, usable):
    monkeypatch.setattr(backend, "_cpu_flags", lambda: flags)
    why = backend._unusable(_FakeOpenBLAS(config))
    assert (why is None) == usable
    if not usable:
        assert "needs AVX-512" in why and config.decode() in why
