"""pid: decode latents (or images) to 2K/4K PNGs with NVIDIA's PiD pixel diffusion decoder."""

__version__ = "0.1.0"

__all__ = ["Decoder", "__version__"]


def __getattr__(name: str):
    # `pid_cli.Decoder` without importing torch for `pid --version` or `pid list`
    if name == "Decoder":
        from pid_cli.pipeline import Decoder

        return Decoder
    raise AttributeError(f"module 'pid_cli' has no attribute {name!r}")
