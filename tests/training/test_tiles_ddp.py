"""The tiled MLP under DDP: each parameter's gradient hook fires once per backward, so two processes train
the adapter one process trains with the same global batch (issue: DDP's 'mark a variable ready only once')."""

from __future__ import annotations

import pytest
from test_distributed import B, launch, max_difference, single_run  # noqa: F401 (single_run: a fixture)


@pytest.mark.slow
def test_ddp_with_a_tiled_mlp_ends_on_the_one_process_adapter(single_run, tmp_path):  # noqa: F811
    out = tmp_path / "ddp-tiles"
    launch(out, f"training.batch_size={B}", "training.mlp_tiles=2")  # every micro-batch's MLP in two tiles
    assert max_difference(out, single_run) < 1e-5


def test_zero3_runs_untiled_and_refuses_explicit_tiles_in_one_line():
    """DeepSpeed's ZeRO-3 linear layers reject a tile's gradients in backward: `auto` is untiled, N refused."""
    from qlora.config.errors import QLoraError
    from qlora.config.long_context import mlp_tiles_for
    from qlora.config.recipe import recipe_from_mapping

    base = {"model": {"name_or_path": "org/m"}, "distributed": {"strategy": "zero3"}}
    with pytest.raises(QLoraError, match=r"^training.mlp_tiles: 2 tiles cannot run under distributed.strategy zero3"):
        recipe_from_mapping(base, ["training.mlp_tiles=2"], for_training=False)
    assert recipe_from_mapping(base, ["training.mlp_tiles=auto"], for_training=False).training.mlp_tiles == "auto"
    assert mlp_tiles_for("auto", 80_000, hidden=4096, strategy="zero3") == 1
    assert mlp_tiles_for("auto", 80_000, hidden=4096, strategy="ddp") == 20
