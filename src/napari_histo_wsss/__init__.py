"""napari-histo-wsss: weakly supervised semantic segmentation of H&E whole-slide images in napari.

The scientific and I/O code lives in :mod:`napari_histo_wsss.core` (no napari/Qt imports); the
``histo-wsss`` command line (:mod:`napari_histo_wsss.cli`) and the dock widgets
(:mod:`napari_histo_wsss.widgets`) are two thin faces over it.
"""

import os as _os

__version__ = "0.1.0"

#: OpenMP waiting policy set at import (only where the user set none of these variables).
#: Why here: the OpenMP runtime (libgomp in the pip wheels, Intel's libiomp in conda builds)
#: reads them once, when torch loads it, so :func:`napari_histo_wsss.core.device.apply_thread_policy`
#: would be too late. Why: by default, torch's threads spin for a while at the end of every
#: parallel region waiting for each other; when another process (the napari GUI, a second job)
#: holds one of the cores, the spinning threads burn the time the descheduled one needs and a
#: training step gets about 10x slower instead of about 1.5x (``bench/bench_threads.py``).
#: Passive waiting (sleep instead of spin) costs little when the machine is idle.
#: ``HISTO_WSSS_THREAD_POLICY=off`` leaves the environment and torch's threads untouched.
OPENMP_WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "GOMP_SPINCOUNT": "0"}


def _set_openmp_wait_env(environ: "_os._Environ[str] | dict[str, str]" = _os.environ) -> dict[str, str]:
    """Set :data:`OPENMP_WAIT_ENV` in ``environ`` unless the user chose a waiting policy (any of
    the three variables: ``GOMP_SPINCOUNT`` overrides ``OMP_WAIT_POLICY`` in libgomp, so setting
    only the missing ones could undo an explicit ``OMP_WAIT_POLICY=ACTIVE``) or turned the
    thread policy off. Returns the variables it set."""
    if environ.get("HISTO_WSSS_THREAD_POLICY", "").strip().lower() in ("off", "0", "none", "torch"):
        return {}
    if any(environ.get(name) for name in OPENMP_WAIT_ENV):
        return {}
    for name, value in OPENMP_WAIT_ENV.items():
        environ[name] = value
    return dict(OPENMP_WAIT_ENV)


_set_openmp_wait_env()
