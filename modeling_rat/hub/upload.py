"""The upload: one commit of the staged folder, and messages for the Hub's errors that say what to do."""

# The Hub API calls, imported here so that tests can replace them on this module (no network in tests).
from huggingface_hub import create_branch, create_repo, get_token, repo_info, upload_folder

from . import HubUploadError


# Weights of an earlier upload that the new commit does not overwrite are deleted in that commit (a stale
# `model.safetensors` next to a new sharded index would otherwise be loaded instead of the new weights).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]


def _transport_errors() -> tuple[type, ...]:
    errors = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            error = getattr(module, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                errors.append(error)
    return tuple(errors)


def hub_error_message(error: BaseException, repo_id: str, revision: str | None = None) -> str:
    """A message that says what went wrong with the Hub and what to do about it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    owner = repo_id.split("/")[0]
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to upload, or use --dry-run to stage only."
    if isinstance(error, RevisionNotFoundError):
        return f"The revision {revision!r} of {repo_id} does not exist and could not be created: check --revision."
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id} was not found, or your token cannot see it: check --repo-id, and that the token belongs to "
            f"{owner!r} or to a member of that organization."
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        server = f" (the Hub said: {error.server_message.strip()})" if getattr(error, "server_message", None) else ""
        if status == 401:
            return f"The Hub rejected the token (401){server}: it is invalid or expired. Log in again with `hf auth login` or pass another --token."
        if status == 403:
            return (
                f"Your token may not write to {repo_id} (403){server}: the namespace {owner!r} belongs to someone else "
                "or the token is read-only. Use a repo id under your own user name or an organization you can write "
                "to, or a token with write access."
            )
        if status is not None and status >= 500:
            return f"The Hub failed ({status}){server}; nothing was committed. Try again later."
        return f"The Hub refused the upload ({status}){server}: {error}"
    if isinstance(error, _transport_errors()):
        return (
            f"Could not reach the Hugging Face Hub ({type(error).__name__}: {error}): check the network connection "
            "(and HF_ENDPOINT or proxy settings); nothing was uploaded. --dry-run stages without the network."
        )
    return f"Upload failed ({type(error).__name__}: {error}); nothing was committed."


def resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubUploadError(
            "No Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token (a token with write access)."
        )
    return token


def upload_staged_folder(
    staging_dir,
    repo_id: str,
    token: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload RAT model",
):
    """Create the repo if needed and upload the staged folder as one commit; returns the commit info."""
    try:
        repo_id = create_repo(repo_id, token=token, private=private or None, exist_ok=True, repo_type="model").repo_id
        if private and not repo_info(repo_id, token=token, repo_type="model").private:
            raise HubUploadError(
                f"{repo_id} already exists and is public; --private does not change an existing repo. Make it private "
                "on the Hub first, or drop --private."
            )
        if revision and revision != "main":
            create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
        return upload_folder(
            repo_id=repo_id,
            folder_path=str(staging_dir),
            commit_message=commit_message,
            revision=revision,
            token=token,
            repo_type="model",
            delete_patterns=STALE_WEIGHT_PATTERNS,
        )
    except HubUploadError:
        raise
    except Exception as error:  # every huggingface_hub failure is mapped to a message that says what to do
        raise HubUploadError(hub_error_message(error, repo_id, revision)) from error
