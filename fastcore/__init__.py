"""stddaq data plane: UDP receive -> assemble -> ImageBuffer -> stream -> HDF5."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stddaq")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
