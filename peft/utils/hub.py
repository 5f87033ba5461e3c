"""Find an adapter file in a local folder or in a (cached) Hugging Face Hub repository."""

from __future__ import annotations

import os
from typing import Optional


def resolve_adapter_file(
    model_id: str,
    filename: str,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    required: bool = True,
    **hub_kwargs,
) -> Optional[str]:
    """Return the local path of `filename` for `model_id`, or None when absent and not `required`.

    `model_id` is a local folder or a hub repository id. Offline (`HF_HUB_OFFLINE=1`), a hub id that is not in
    the local cache fails at once with a message saying so instead of waiting on the network.
    """
    if not isinstance(model_id, (str, os.PathLike)):
        raise TypeError(f"model_id must be a folder path or a hub repository id, got {type(model_id).__name__}")
    model_id = os.fspath(model_id)
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(folder):
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise FileNotFoundError(f"No '{filename}' in the adapter folder '{folder}'.")
        return None
    if os.path.isdir(model_id) or _looks_like_path(model_id):
        raise FileNotFoundError(f"Adapter folder '{folder}' does not exist.")
    return _from_hub(model_id, filename, subfolder, revision, required, **hub_kwargs)


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or model_id.count("/") > 1 or "\\" in model_id


def _from_hub(model_id, filename, subfolder, revision, required, **hub_kwargs) -> Optional[str]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    kwargs = {k: v for k, v in hub_kwargs.items() if k in hub_download_arguments() and v is not None}
    offline = is_offline()
    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder, revision=revision, **kwargs)
    except LocalEntryNotFoundError as exc:  # before EntryNotFoundError: a subclass of it in huggingface_hub >= 1
        if not required:
            return None
        where = "HF_HUB_OFFLINE=1 is set and it is not in the local cache" if offline else "it could not be fetched"
        raise FileNotFoundError(
            f"'{model_id}' is not a local folder, and '{filename}' of hub repository '{model_id}' is unavailable: "
            f"{where}."
        ) from exc
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"No '{filename}' in hub repository '{model_id}'.") from None
        return None
    except HFValidationError as exc:
        raise FileNotFoundError(f"'{model_id}' is neither an existing folder nor a valid hub repository id.") from exc


def is_offline() -> bool:
    """True when the hub must not be contacted (`HF_HUB_OFFLINE`, read now or when huggingface_hub loaded)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_download_arguments() -> frozenset[str]:
    """Keyword arguments `huggingface_hub.hf_hub_download` takes besides the file's location."""
    import inspect

    from huggingface_hub import hf_hub_download

    return frozenset(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder", "revision"}


def push_folder_to_hub(save, repo_id: str, commit_message: str, private, token, **save_kwargs):
    """`save(folder, **save_kwargs)` into a temporary folder, then upload it to the Hub repo `repo_id` (created when
    missing); returns the upload's commit info."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save(folder, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
