"""The one error type for bad training data, so callers can tell it from bugs."""


class DataFormatError(ValueError):
    """A record cannot be used; the message names the file, the line or byte offset, and the reason."""
