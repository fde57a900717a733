"""Cards and uploads for the Hugging Face Hub: a README.md with YAML front matter, and `push_folder`.

A card is what the Hub shows and indexes, written through huggingface_hub's card classes
(`DatasetCard`/`DatasetCardData`, `ModelCard`/`ModelCardData`): the YAML block at the top (license, tags, base_model,
the data files of a dataset's splits) and a body that says how the thing was made (models,
settings, funnel, versions, the command line), all read from the files our commands write
(run.json, stats.json, <set>.funnel.json, train.json). `push_folder` creates the repository
if needed and uploads one folder in one commit through `huggingface_hub.HfApi`; the token is
huggingface_hub's own (`hf auth login` or $HF_TOKEN). Upload errors become one line.
export.py and train.py use it; nothing here loads models or reads data rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


class HubError(UserError, RuntimeError):
    """An upload that could not be done (no token, no access, network); the message says what to do."""


def card_text(data, body: str) -> str:
    """A card's text: huggingface_hub's card data (`DatasetCardData`, `ModelCardData`: None values left out) as
    the YAML block the Hub reads, then the Markdown body; the text `DatasetCard(...)`/`ModelCard(...)` take."""
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def read_card_meta(path: Path) -> dict[str, Any]:
    """The YAML front matter of a card, as huggingface_hub reads it (tests and readers); {} when it has none."""
    from huggingface_hub import metadata_load

    return metadata_load(Path(path)) or {}


def json_block(data: Any) -> str:
    return "```json\n" + json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n```\n"


def settings_table(settings: dict[str, Any]) -> str:
    """A two-column Markdown table of settings (lists and mappings as JSON)."""
    rows = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        shown = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
        rows.append(f"| {key} | `{shown}` |".replace("\n", "\\n"))
    return "\n".join(rows) + "\n"


def hub_id_or_none(name: str | None) -> str | None:
    """`name` when it reads as a hub repo id (org/name) and is no local path; else None (cards list hub ids only)."""
    from .data.chat import is_hub_id

    if not name or Path(name).expanduser().exists() or not is_hub_id(name) or "/" not in name:
        return None
    return name


def require_token(repo_id: str) -> None:
    """Fail before any work when no Hugging Face token is set up for `--push-to-hub repo_id`."""
    from huggingface_hub import get_token

    if not get_token():
        raise HubError(f"--push-to-hub {repo_id}: no Hugging Face token found; log in with `hf auth login` or set "
                       "HF_TOKEN, or leave out --push-to-hub")


def push_folder(folder: Path, repo_id: str, *, repo_type: str, private: bool = False,
                allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None,
                message: str = "Upload with tracetailor",
                log: Callable[[str], None] = print, later: str | None = None) -> str:
    """Create `repo_id` (kept if it exists) and upload `folder` to it in one commit; the commit's URL. `later`: how
    to retry, for the message of a failed upload (default: upload the folder later)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder),
                                   allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                   commit_message=message)
    except Exception as e:  # no token, no access, offline: one line, with what to do
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: {first}); log in with "
                       f"`hf auth login` or set HF_TOKEN, check the repo name; then {later or f'upload {folder} later'}"
                       ) from e
    url = getattr(commit, "commit_url", None) or str(commit)
    log(f"pushed {folder} to https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}")
    return url


def push_checkpoint(out: Path, repo_id: str, private: bool, log: Callable[[str], None]) -> str:
    """train --push-to-hub: the checkpoint in `out` with its card, without intermediate checkpoints or hidden files."""
    return push_folder(out, repo_id, repo_type="model", private=private, log=log,
                       ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*"], message="tracetailor train")


def model_card(record: dict[str, Any]) -> str:
    """README.md of a checkpoint from train.json's record: base model, data (and its select funnel), settings,
    result, versions."""
    import sys

    cfg, result = record["config"], record["result"]
    base, data = cfg.get("model", ""), cfg.get("data", "")
    funnel = Path(f"{data}.funnel.json")
    from huggingface_hub import ModelCard, ModelCardData

    meta = ModelCardData(base_model=hub_id_or_none(base), library_name="transformers", pipeline_tag="text-generation",
                         tags=["tracetailor", "sft", "trl"] + (["lora"] if cfg.get("lora") else []),
                         datasets=[hub_id_or_none(data)] if hub_id_or_none(data) else None)
    lines = [f"# {Path(cfg.get('out') or 'checkpoint').name}\n",
             f"`{base}` fine-tuned by `tracetailor train` (TRL's SFTTrainer, loss on the completion tokens only) on "
             f"`{data}`: {result['examples']} examples, {result['completion_tokens']} completion tokens, "
             f"{result['steps']} steps, loss {result['first_loss']} -> {result['last_loss']}.\n",
             f"Command: `{' '.join(sys.argv)}`\n"]
    if funnel.is_file():
        counts = {k: v for k, v in json.loads(funnel.read_text(encoding="utf-8")).items()
                  if k not in ("settings", "inputs", "out")}
        lines += ["## The SFT set's funnel (tracetailor select)\n", json_block(counts)]
    lines += ["## Settings\n", settings_table(cfg), "## Result\n", json_block(result),
              "## Versions\n", json_block(record.get("versions", {}))]
    return str(ModelCard(card_text(meta, "\n".join(lines))))
