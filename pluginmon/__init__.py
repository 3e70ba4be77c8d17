"""pluginmon: the one import name of this distribution.

The code lives in the repository's top-level folders (daemon/, collectors/, storage/,
alerts/, registry/, sql/); setuptools' package-dir installs each as ``pluginmon.<folder>``. The
symlinks beside this file give the same view to tools that read the source tree directly
(mypy, import-linter, pytest from a checkout without an install).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pluginmon")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0+unknown"
