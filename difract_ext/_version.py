"""The package version: one place, read by ``difract_ext.__version__`` and by setuptools."""

__version__ = "0.1.0"
