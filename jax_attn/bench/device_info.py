"""What the numbers were measured on: device, driver and library versions, memory, L2 size.

`environment()` goes into every results document (and `benchmarks/` scripts reuse it), so a
table can always be traced to its machine. `_device_memory_limit` lets the runners skip
programs that would not fit; `_l2_bytes` sizes the input rotation that keeps caches honest.
"""
from __future__ import annotations

import datetime
import platform as py_platform
import subprocess


def environment() -> dict:
    """Device, driver and library versions, for the results file."""
    import jax

    from .. import autoselect
    dev = jax.devices()[0]
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": py_platform.node(), "python": py_platform.python_version(),
           "platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
           "device_count": jax.device_count(), "device_key": autoselect.device_key(),
           "jax": jax.__version__}
    try:
        import jaxlib
        env["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    try:
        from jax._src.lib import cuda_versions
        if cuda_versions and dev.platform == "gpu":
            env["jax_cudnn"] = str(cuda_versions.cudnn_get_version())
            env["jax_cuda_runtime"] = str(cuda_versions.cuda_runtime_get_version())
    except Exception:  # private module; versions are informative only
        pass
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch_cuda"] = torch.version.cuda
            env["torch_cudnn"] = str(torch.backends.cudnn.version())
            env["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        env["torch"] = "not installed"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            name, driver, mem, clk = (x.strip() for x in smi.stdout.strip().splitlines()[0].split(","))
            env.update(gpu=name, driver=driver, gpu_memory=mem, max_sm_clock=clk)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return env


def _device_memory_limit() -> int | None:
    import jax
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return stats.get("bytes_limit") if stats else None


def _l2_bytes() -> int:
    """L2 size of the GPU (torch knows it), 50 MB (H100) if unknown; 4 MiB on a CPU."""
    import jax
    if jax.default_backend() != "gpu":
        return 4 << 20
    try:
        import torch
        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).L2_cache_size)
    except Exception:
        pass
    return 50 << 20
