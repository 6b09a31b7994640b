"""The memory profiler: what a training step of full FT, LoRA or QLoRA holds, component by component.

inventory (meta device) -> estimate (bytes per component and phase; sharding for one GPU's share) ->
planner (what fits, what to change) -> report (tables, JSON, plots); merge: what `qlora merge` needs.
"""
