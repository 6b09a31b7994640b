"""Memory-saving operations as plain autograd functions and modules: the chunked loss, the tiled MLP and
checkpoint offload. They know nothing of recipes: `qlora.model` installs them as a recipe asks."""
