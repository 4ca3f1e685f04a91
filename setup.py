"""Packaging glue that pyproject.toml cannot express: the checkpoint registry lives at the repository's top level
(`registry.yaml`, one file, no symlink, so any checkout works, Windows included) and ships in the wheel as
`pid_cli/registry.yaml`, copied into the build at build time. MANIFEST.in puts it in the sdist, so a wheel built
from the sdist has it too. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REGISTRY = Path(__file__).resolve().parent / "registry.yaml"


class BuildPyWithRegistry(build_py):
    """build_py, then the top-level registry.yaml into the built package. An editable install builds nothing
    (`pid_cli.registry` reads the top-level file from the checkout then)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(REGISTRY), str(Path(self.build_lib, "pid_cli", "registry.yaml")))


setup(cmdclass={"build_py": BuildPyWithRegistry})
