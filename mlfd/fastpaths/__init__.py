"""Fast paths that check themselves (design §15): the verdict, its cache, and what `auto` uses.

Every fast path (the Triton KD kernel, torch.compile of the loss, DALI GPU decoding, bf16 /
fp16 autocast) is compared with its reference once per environment by
:mod:`mlfd.fastpaths.checks` (``mlfd info --check``). The report is cached as JSON in the
user's cache directory (``MLFD_CACHE_DIR``, else platformdirs' user cache dir), under a
digest of what could change the answer: the versions of mlfd, its kernel source, torch,
triton and every installed DALI wheel, the device and the driver.

On CUDA, ``auto`` uses only what passed, falling back along a fixed order with one
``warning:`` line naming the path, the cause and the fix:

* loss backend: triton -> compile -> torch
* pipeline:     DALI GPU (``dali``) -> DALI CPU (``dali-cpu``) -> torch
* precision:    bf16 -> fp16 with a GradScaler -> fp32

An explicit choice that did not pass is an error. On CPU nothing is checked at run time:
``auto`` is fp32, the torch loss and the pipeline
:func:`mlfd.data.pipelines.build_pipeline` picks. Resolved choices are memoised on the run's
options (``RunOptions.fast``), so each warning is printed once per command.

The modules, each importing only those before it:

* :mod:`.environment` -- what this machine has (paths, versions, device, driver, DALI
  wheels) and the key a verdict is cached under; patch it there to simulate a machine;
* :mod:`.checks` -- the probes, in this process or in child processes;
* :mod:`.verdict` -- the cached report, run when missing;
* :mod:`.decide` -- ``auto`` and explicit choices, their warnings and errors.

This package only re-exports them (a patch of a re-exported name here reaches no caller).
Layering: imported by mlfd.stages, mlfd.info and the CLI; imports mlfd.engine, mlfd.losses
and mlfd.data (lazily), never the other way round.
"""

from .decide import (
    CHAINS,
    PRECISIONS,
    check_explicit,
    check_precision,
    choose,
    loss_backend,
    pipeline_backend,
    precision,
    report_for,
    require,
    used,
)
from .environment import (
    PATHS,
    SCHEMA,
    STATUSES,
    dali_wheels,
    device_name,
    driver_cuda_version,
    env_key,
    needs_check,
    wheel_cuda_major,
)
from .verdict import cache_dir, cache_file, check, load_report

__all__ = [
    "CHAINS", "PATHS", "PRECISIONS", "SCHEMA", "STATUSES", "cache_dir", "cache_file", "check",
    "check_explicit", "check_precision", "choose", "dali_wheels", "device_name",
    "driver_cuda_version", "env_key", "load_report", "loss_backend", "needs_check",
    "pipeline_backend", "precision", "report_for", "require", "used", "wheel_cuda_major",
]
