"""attnkit.diffusion"""
