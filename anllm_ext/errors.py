"""Exceptions of anllm_ext."""


class UnsupportedError(ValueError):
    """A model, cache or option that anllm_ext deliberately does not handle (the message says which
    and what to do instead), as opposed to bad values of a supported input."""
