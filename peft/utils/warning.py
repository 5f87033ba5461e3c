"""The warning category of this package (upstream's `peft.utils.warning.PeftWarning`)."""


class PeftWarning(UserWarning):
    """Warnings about a PEFT setup that works but may not do what was meant (filter them by this category)."""


__all__ = ["PeftWarning"]
