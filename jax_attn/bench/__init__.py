"""`jax-attn bench`: time every backend on named shape sets and feed the measurements to routing.

For each shape and each implementation (every available JAX backend, `auto` as its own row, and
torch SDPA's kernels when torch is installed), forward and forward+backward:

1. Reasons first: a backend that cannot serve the shape shows `explain`'s reasons, not a number.
2. Compile once (ahead of time) and read the program's `memory_analysis()`: its temp bytes are the
   memory a backend needs beyond inputs and outputs (quadratic in sequence length for `xla` and
   `naive`, linear for `chunked`, `pallas`, `cudnn`). A program that would not fit the device is
   reported, not run.
3. Correctness before timing: sampled query rows of two (batch, head) slices against the float64
   NumPy reference (`jax_attn.reference`). For the backward, the output cotangent is zero except
   on those rows, so the reference on the sub-problem gives the exact dq of those rows and the
   full dk, dv of those slices, at any sequence length.
4. Timing as the field does it: warm-up, a device sync around each sample, the median of at least
   `--min-runs` samples; inputs rotated among several sets when one set is smaller than twice the
   L2 cache; calls shorter than `--short-us` are repeated inside one compiled program (a
   `fori_loop`, JAX) or one CUDA graph (torch), so launch overhead stays out of the number.

5. `auto` against the fastest JAX backend: each compiled program is fingerprinted (its optimized
   HLO without source metadata). When `auto` compiles to the very program of the fastest backend,
   their difference is timing noise (a few percent on calls of tens of microseconds), and the
   summary counts it as equal, showing the measured ratio beside it.

Results: a table (ms, TFLOP/s, ratio to the fastest row of the same shape), `--json`, `--csv`,
`--plot` (PNG bars of TFLOP/s), and `--write-routing` / `--update-routing`, which turn a run into
this GPU's table of the routing data, `jax_attn/data/routing.json` (see `routing_from_results`).

CLI entry points: `add_parser(subparsers)` (sets `run` as the sub-command's handler) and
`main(argv)` for running this module alone.
"""
from __future__ import annotations

# One concern per module (each module's docstring says what and why):
#   shapes          Shape, SHAPE_SETS, select_shapes
#   device_info     environment() for the results file; device memory limit, L2 size
#   timing          samples and their median, in-program loops (JAX), CUDA graphs (torch)
#   gate            the correctness gate against the float64 reference
#   jax_runner      JAX rows: reasons, compile, memory, gate, timing; program fingerprints
#   torch_runner    torch SDPA rows
#   suite           the run: shapes x implementations x modes -> results document
#   report          ratios, table, auto summary, CSV, plot
#   cli             options, `add_parser`, `run`, `main`
# The routing writer (results -> jax_attn/data/routing.json) lives beside its reader,
# jax_attn.autoselect, as jax_attn.routing_writer; its names are re-exported here.
# Every name the single-module `jax_attn.bench` had is re-exported here, so `bench.X` and
# `from jax_attn.bench import X` keep working. Code inside the package imports from the module
# that defines a name, so to monkeypatch a name for the code that uses it, patch it there
# (e.g. `jax_attn.bench.jax_runner._device_memory_limit`), not on this package.

import logging

from .cli import _add_arguments, add_parser, main, run, shape_arg, shape_sets_arg  # noqa: F401
from .device_info import _device_memory_limit, _l2_bytes, environment  # noqa: F401
from .gate import CHECK_ROWS, _check_slices, _reference_errors, _short_message, _tolerance  # noqa: F401
from .jax_runner import (  # noqa: F401
    JaxInputs, _jax_fn, _pallas_kernel, jax_reasons, measure_jax, program_fingerprint)
from .report import (  # noqa: F401
    CSV_FIELDS, _add_ratios, _fmt, auto_summary, format_table, write_csv, write_plot)
from ..routing_writer import ROUTING_MODES, predicted_auto, routing_from_results, write_routing  # noqa: F401
from .shapes import MODES, SHAPE_SETS, GiB, MiB, Shape, select_shapes  # noqa: F401
from .suite import QUADRATIC, run_bench, select_impls  # noqa: F401
from .timing import (  # noqa: F401
    NO_HOISTING, Timing, _jax_looped, _n_sets, _time_samples, _timing_fields, _torch_graph)
from .torch_runner import (  # noqa: F401
    TORCH_KERNELS, TorchInputs, _release_torch_memory, _torch_call, measure_torch, torch_kernels)

log = logging.getLogger(__name__)
