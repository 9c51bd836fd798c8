"""Test session set-up: 8 simulated CPU devices (sequence-parallel tests) and Pallas interpret mode.

Both must be set before JAX initializes its backends, hence here and not in the test modules.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_ATTN_INTERPRET", "1")
