"""The errors the library raises for misuse; each message names the value and the fix."""


class SPConfigError(ValueError):
    """A sequence-parallel configuration or input that cannot work; the message names the fix."""


class KernelError(ValueError):
    """An attention backend that is unknown, not installed, or cannot do what a call asks."""
