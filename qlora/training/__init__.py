"""Orchestration of a run: train (recipe -> plan -> model -> data -> Trainer -> save), processes, checkpoints,
stops, out-of-memory handling, metrics, sweeps, and the profiler's measured mode."""
