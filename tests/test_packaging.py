"""Our kernels live at `jax_attn.kernels`, leaving the top-level name `kernels` to Hugging Face.

diffusers and transformers probe `importlib.util.find_spec("kernels")` to decide whether the hub
`kernels` package is installed; a top-level `kernels` of ours would fool that probe.
"""
import importlib.util
import pathlib

import jax_attn

REPO = pathlib.Path(jax_attn.__file__).resolve().parent.parent


def test_top_level_kernels_name_is_not_ours():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or REPO not in pathlib.Path(spec.origin or "").resolve().parents


def test_our_kernels_import_under_the_package():
    spec = importlib.util.find_spec("jax_attn.kernels")
    assert spec is not None and REPO in pathlib.Path(spec.origin).resolve().parents


def test_cli_entry_point_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'jax-attn = "jax_attn.cli:main"' in text
