"""The data layer's error for unreadable media, below every module that raises it (shards,
video, media, the loaders)."""


class DecodeError(RuntimeError):
    """A media file that cannot be decoded (missing, empty, truncated, unsupported)."""
