"""pid: decode latents (or images) to 2K/4K PNGs with NVIDIA's PiD pixel diffusion decoder."""

__version__ = "0.1.0"
