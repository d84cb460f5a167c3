"""attnkit.diffusion (minimal placeholder from the wt-rfsolver branch: the lead keeps his own __init__.py)."""
