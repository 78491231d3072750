"""labkit: build a large language model stage by stage, and see each stage work."""

__version__ = "0.1.0"
