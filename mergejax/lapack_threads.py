"""One BLAS thread under XLA's CPU LAPACK kernels (SVD, eigh) while a merge that uses them runs.

On CPU, jaxlib takes LAPACK from SciPy (its OpenBLAS), and XLA runs independent LAPACK calls at
once on its own thread pool: the T task matrices of jax's batched SVD, and separate SVDs of one
program. Each call's BLAS then hands work to OpenBLAS's own threads, and the concurrent callers
wait on one OpenBLAS thread server. On 2 cores this turned TSV-M's second call on one ViT block
from 2.8 s into more than 3.5 minutes (the "stall" of launch/bench_rules.py: two XLA threads in
`sgesdd` -> `sgemm_thread_nn` / `sger_thread` -> `exec_blas_async_wait`, found with py-spy and
gdb); with OpenBLAS on one thread XLA's pool is the parallelism and nothing oversubscribes.
Rules registered with `lapack=True` run under `single_threaded_blas()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
  """Within: every loaded BLAS (SciPy's OpenBLAS, which XLA's LAPACK kernels call) on one thread.

  The limit is process-wide while the context is open; it is restored on exit. Callers must
  wait for their computations (`jax.block_until_ready`) before leaving it.
  """
  import scipy.linalg.cython_lapack  # noqa: F401, PLC0415 (jaxlib's LAPACK: loaded, so limited)
  import threadpoolctl  # noqa: PLC0415

  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    yield
