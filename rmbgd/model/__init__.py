"""The segmentation model: hub access, loading and running it, export backends, foreground refinement."""
