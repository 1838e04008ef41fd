"""The Edgefleet device agent: runs the model the plane assigns and serves it locally."""

__version__ = "0.1.0"
