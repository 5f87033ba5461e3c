"""Adapter names: one check for every place a name enters, and the folder a named adapter is saved in.

An adapter name becomes a module key (`lora_A.<name>`) and, when saving, a sub-folder of the save folder
(`<save_directory>/<name>`, except "default", which is saved at the top). So it must be one safe path component:
a non-empty string without path separators, dots (module keys split on them; this also rules out `.` and `..`)
or NUL characters.
"""

from __future__ import annotations

import os
from typing import Any

_FORBIDDEN = (("/", "a '/'"), ("\\", "a '\\'"), ("\x00", "a NUL character"), (".", "a '.'"))


def _problem(name: Any) -> str:
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    for char, what in _FORBIDDEN:
        if char in name:
            return f"it contains {what}"
    return ""


def check_adapter_name(name: Any) -> str:
    """Return `name` if it is a valid adapter name, else raise a ValueError saying why and what is expected."""
    problem = _problem(name)
    if problem:
        raise ValueError(
            f"Invalid adapter_name {name!r}: {problem}. An adapter name is a module key and the name of the "
            "sub-folder it is saved in, so it must be a non-empty string that is a single path component, without "
            "'/', '\\', '.' or NUL characters (e.g. 'default', 'my_adapter')."
        )
    return name


def adapter_folder(save_directory: str, name: str) -> str:
    """The folder adapter `name` is saved in: `save_directory` for "default", else `save_directory/<name>`.
    Refuses a name that is not a valid adapter name (whatever put it in the model) and a sub-folder that resolves
    outside `save_directory` (e.g. a symbolic link), so a save never writes elsewhere."""
    check_adapter_name(name)
    save_directory = os.fspath(save_directory)
    if name == "default":
        return save_directory
    folder = os.path.join(save_directory, name)
    root = os.path.realpath(save_directory)
    if os.path.dirname(os.path.realpath(folder)) != root:
        raise ValueError(
            f"The sub-folder for adapter {name!r}, {folder!r}, resolves to {os.path.realpath(folder)!r}, outside the "
            f"save folder {root!r} (a symbolic link?); remove it or save elsewhere."
        )
    return folder
