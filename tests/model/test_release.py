"""A dropped 4-bit model is freed at once: bitsandbytes' layer <-> weight cycles are broken by `release`."""

import gc
import json
import subprocess
import sys
import weakref

import bitsandbytes as bnb
import torch
from conftest import profile_recipe

from qlora.model.load import load_base_model
from qlora.model.release import release


def _four_bit_refs(model) -> list[weakref.ref]:
    """Weak references to what holds the memory: every 4-bit layer and its quantized weight (its storage's owner)."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return [weakref.ref(m) for m in layers] + [weakref.ref(m.weight) for m in layers]


def test_without_release_a_dropped_4bit_model_outlives_its_last_reference(tiny_llama):
    """The premise: bitsandbytes' back-reference keeps each layer alive until a collection runs."""
    recipe = profile_recipe(tiny_llama)
    gc.disable()
    try:
        model = load_base_model(recipe, torch.float32, device="cpu")
        refs = _four_bit_refs(model)
        del model
        assert len([r for r in refs if r() is not None]) == len(refs) == 28  # 14 layers and their weights
    finally:
        gc.enable()
        gc.collect()


def test_a_4bit_model_built_twice_frees_the_first_before_the_second_is_built(tiny_llama):
    recipe = profile_recipe(tiny_llama)
    gc.disable()  # no collection may be needed
    try:
        first = load_base_model(recipe, torch.float32, device="cpu")
        refs = _four_bit_refs(first)
        assert len(refs) == 28
        release(first)
        del first
        assert [r for r in refs if r() is not None] == []
        second = load_base_model(recipe, torch.float32, device="cpu")
        assert len(_four_bit_refs(second)) == 28
        release(second)
    finally:
        gc.enable()


def test_profile_measure_of_two_methods_leaves_no_4bit_layer_alive(llama_config):
    """`qlora profile --measure` with two methods and automatic collection off: no Linear4bit alive at exit."""
    code = (
        "import gc, sys; gc.disable()\n"
        "from qlora.profile import main\n"
        f"main(['--model', {str(llama_config)!r}, '--methods', 'qlora,lora', '--measure', '--seq-len', '32',"
        " '--batch-size', '2', '--rank', '4', '--format', 'json'])\n"
        "import bitsandbytes as bnb\n"
        "alive = [o for o in gc.get_objects() if isinstance(o, bnb.nn.Linear4bit)]\n"
        "print('alive', len(alive))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    *report, alive = out.stdout.strip().splitlines()
    assert alive == "alive 0"
    # stdout is the JSON alone (DeepSpeed, when installed, announces its CPU fallback unless told up front)
    assert [r["method"] for r in json.loads("\n".join(report))["runs"][0]["results"]] == ["qlora", "lora"]
