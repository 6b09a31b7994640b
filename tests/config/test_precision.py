"""`compute_dtype: auto` on GPUs this machine does not have: the CUDA queries are mocked."""

import pytest
import torch

from qlora.config import precision
from qlora.config.precision import native_bf16, resolve_compute_dtype, trainer_precision_flags


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible CUDA device of the given compute capability whose torch claims bf16 (emulated) support."""

    def install(major: int, minor: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        # torch >= 2.3 counts emulated bf16 by default: True on a T4, which is the bug this guards against
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or major >= 8
        )
        monkeypatch.setattr(torch.version, "hip", None)

    return install


@pytest.mark.parametrize("capability", [(7, 5), (7, 0)], ids=["T4 sm_75", "V100 sm_70"])
def test_auto_is_fp16_below_ampere_even_when_torch_reports_emulated_bf16(fake_gpu, capability):
    fake_gpu(*capability)
    assert torch.cuda.is_bf16_supported() is True  # the mock behaves like torch 2.13 on a T4
    assert native_bf16() is False
    assert precision.default_device() == "cuda"
    dtype = resolve_compute_dtype("auto")
    assert dtype == torch.float16
    assert trainer_precision_flags(dtype) == {"bf16": False, "fp16": True}


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0)], ids=["A100 sm_80", "4090 sm_89", "H100 sm_90"])
def test_auto_is_bf16_from_compute_capability_8(fake_gpu, capability):
    fake_gpu(*capability)
    dtype = resolve_compute_dtype("auto")
    assert dtype == torch.bfloat16
    assert trainer_precision_flags(dtype) == {"bf16": True, "fp16": False}


def test_explicit_dtype_and_cpu_are_unchanged(fake_gpu):
    fake_gpu(7, 5)
    assert resolve_compute_dtype("bfloat16") == torch.bfloat16  # the user asked: their choice stands
    assert resolve_compute_dtype("auto", device="cpu") == torch.float32


def test_no_gpu_has_no_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_bf16() is False
    assert resolve_compute_dtype("auto") == torch.float32


def test_the_trainer_loads_a_t4_run_in_fp16(fake_gpu, monkeypatch):
    """qlora.model.build asks precision for the dtype; capture what it would pass to the 4-bit load."""
    import qlora.model.build as model

    fake_gpu(7, 5)
    seen = {}

    def fake_load_base_model(recipe, compute_dtype, *args, **kwargs):
        seen["dtype"] = compute_dtype
        raise RuntimeError("stop here")

    monkeypatch.setattr(model, "load_base_model", fake_load_base_model)
    from qlora.config.recipe import recipe_from_mapping

    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": "x"},
            "data": {"path": "d.jsonl"},
            "output_dir": "o",
            "training": {"kernels": "none"},
        }
    )  # no config of 'x' to read for the fused kernels
    assert recipe.quantization.compute_dtype == "auto"
    with pytest.raises(RuntimeError, match="stop here"):
        model.build_model(recipe, tokenizer=type("Tokenizer", (), {"pad_token_id": 0})())
    assert seen["dtype"] == torch.float16
