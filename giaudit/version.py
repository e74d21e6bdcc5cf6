"""The package version (its own module so library code reads it without importing the package's lazy API)."""
__version__ = "0.1.0"
