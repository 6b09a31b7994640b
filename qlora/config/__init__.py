"""What a run is, and the vocabulary every other layer shares: the recipe schema and its checks, GPU sizes,
the precision policy, the long-context rules, the error type and crash-safe writes. Imports no other layer."""
