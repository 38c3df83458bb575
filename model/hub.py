"""Where a checkpoint comes from: a local folder, the Hugging Face hub, or the embedded tiny default. No torch
here: the gateway resolves checkpoints (for their configs and tokenizer) without importing it."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

# What a gateway needs from the hub (configs, tokenizer, chat template), and what a rank needs: that plus weights.
TOKENIZER_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model"]
_HUB_PATTERNS = [*TOKENIZER_PATTERNS, "*.safetensors"]


def resolve_checkpoint(model: str | os.PathLike, revision: str | None = None,
                       patterns: list[str] | None = None) -> Path:
    """A local checkpoint folder, or a hub repo id fetched (or found offline) with `snapshot_download`
    (only the files matching `patterns`, default: everything the model needs)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"--model {model}: is a file; expected a checkpoint folder or a hub id")
        return path
    text = str(model)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"--model {model}: no such folder, and not a hub id of the form 'org/name'")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=patterns or _HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"--model {text}: HF_HUB_OFFLINE=1 is set and the model is not in the local hub cache "
                f"({constants.HF_HUB_CACHE}); download it once without HF_HUB_OFFLINE, or pass a local folder"
            ) from e
        raise CheckpointError(f"--model {text}: could not reach the hub and no cached copy exists ({e})") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"--model {text}: no such repository on the hub (or it is private/gated)") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"--model {text}: hub download failed: {e}") from e


def default_model_dir() -> Path:
    """The embedded default model: the tiny checkpoint, made on first use in the user's cache folder."""
    import os
    import shutil
    import tempfile

    root = Path(os.environ.get("DGSERVE_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "dgserve")
    target = root / "tiny-v2-seed0"  # v2: the vision tower, processor files, image parts in the template
    if (target / "model.safetensors.index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    from .tiny import make_tiny  # torch: only when the folder must be written

    make_tiny(tmp, seed=0)
    try:
        tmp.rename(target)  # atomic: concurrent first uses never see a half-written folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
