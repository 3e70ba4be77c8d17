"""pluginmon: the one import name of this distribution.

The code lives in the repository's top-level folders (daemon/, collectors/, storage/,
alerts/, registry/, sql/); setuptools' package-dir installs each as ``pluginmon.<folder>``. The
symlinks beside this file give the same view to tools that read the source tree directly
(mypy, import-linter, pytest from a checkout without an install).
"""


def __getattr__(name: str) -> str:
    # ``__version__`` is looked up when asked: importlib.metadata costs tens of milliseconds
    # at every start, and `pluginmon run` guards its signals only after this import.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pluginmon")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0.0.0+unknown"
