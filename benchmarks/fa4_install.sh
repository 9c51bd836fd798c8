#!/usr/bin/env bash
# FlashAttention-4 on the device machine, whose calls each lay the tree anew and reach no index.
# The wheels (pip download --no-deps, py3.12 manylinux: flash-attn-4 4.0.0b36, nvidia-cutlass-dsl
# 4.8.1 + libs-base/core/cu13, quack-kernels, apache-tvm-ffi, jax-tvm-ffi, torch-c-dlpack-ext,
# cuda-bindings, cuda-pathfinder, einops, protobuf) travel in two ignored folders, the 92 MB
# libs-cu13 wheel split in two (`split -b 46M`), because one call carries at most 64 MiB:
#   call 1, carry .fa4a:  bash benchmarks/fa4_install.sh stage     # copies .fa4a to /tmp/fa4wheels
#   call 2, carry .fa4b:  source benchmarks/fa4_install.sh install # joins, installs, sets PYTHONPATH
# Call 2 must follow call 1 at once: the machine keeps /tmp only while it stays warm (30 s).
WHEELS=/tmp/fa4wheels SITE=/tmp/fa4site
case "${1:-}" in
  stage)
    mkdir -p "$WHEELS" && cp .fa4a/* "$WHEELS"/ && ls "$WHEELS" | wc -l
    ;;
  install)
    cp .fa4b/* "$WHEELS"/ \
      && cat "$WHEELS"/cu13.part.* > "$WHEELS"/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl \
      && rm -f "$WHEELS"/cu13.part.* \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
      || echo "fa4_install: install failed"
    # --target skips the wheels' .pth files: the CuTe DSL's own packages go on the path by hand.
    export PYTHONPATH="$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
    ;;
  *) echo "usage: fa4_install.sh stage|install" >&2 ;;
esac
