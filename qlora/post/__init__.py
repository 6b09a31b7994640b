"""After training: generate with an adapter, merge it into a 16-bit model, export it with a model card."""
