"""`OUTPUT_DIR/extract_settings.json`: the settings that decide the outputs of `spidr-fast extract`.

A run records them once its model is loaded, before writing any output (a run that fails
earlier, e.g. on a checkpoint without its config, leaves the folder as it was); a rerun first
compares its own:
- the same: complete outputs are skipped, missing or partial ones (re)done;
- different: refused, naming each difference, unless `--overwrite`, which first deletes the
  recorded settings' outputs of the inputs (and this run's), then recomputes every input;
- no record but complete outputs present (their settings are unknown): refused unless `--overwrite`.

Recorded: the checkpoint's identity (SHA-256 of the weights file and of its config file, or the
released model's name), the layers, units (a k-means file's SHA-256 too), merged runs and units
layer, the residual side, the compute and saved dtypes, the format, the chunking and spidr_fast's
version. `--resample` / `--downmix` are recorded as the conversions allowed so far: they change no
output of a 16 kHz mono file, only let files that would fail be converted, so a rerun that adds
them is accepted (the record keeps the union) and one that drops them keeps the converted outputs
it finds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spidr_fast.io import atomic_write_text

SETTINGS_FILE = "extract_settings.json"
CONVERSIONS = ("resample", "downmix")  # allowed conversions: merged, never a conflict


class SettingsConflict(ValueError):
    """OUTPUT_DIR holds outputs made with other (or unknown) settings; the message names the differences."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(spec: str, released: tuple[str, ...], config: Path | None = None) -> dict[str, str]:
    """{"release": name} for a released model, else the SHA-256 of the weights and of the config file used."""
    if spec in released:
        return {"release": spec}
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    identity = {"weights_sha256": file_sha256(path)}
    config_file = config if config is not None else path.parent / "config.json"
    if config_file.is_file():
        identity["config_sha256"] = file_sha256(config_file)
    return identity


def output_names(layers: list[int], units: str | None, *, dedup: bool = False) -> list[str]:
    """Names of the arrays written per input: layer{n}..., then units ("probs" for codebook-probs),
    then durations (--dedup: the units are those of the runs)."""
    unit_names = (["probs"] if units == "codebook-probs" else ["units"]) if units else []
    return [f"layer{n}" for n in sorted(set(layers))] + unit_names + (["durations"] if dedup else [])


def read_settings(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SettingsConflict(f"{path} is unreadable ({exc}): pass --overwrite to recompute everything") from exc
    if not isinstance(settings, dict):
        raise SettingsConflict(f"{path} does not hold a settings object: pass --overwrite to recompute everything")
    return settings


def write_settings(out_dir: Path, settings: Mapping[str, Any]) -> Path:
    return atomic_write_text(out_dir / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'name: old -> new' for every setting (conversions aside) that differs; dicts compared per key."""
    lines = []
    for key in sorted((set(old) | set(new)) - set(CONVERSIONS)):
        before, after = old.get(key, "(not recorded)"), new.get(key, "(not recorded)")
        if isinstance(before, dict) and isinstance(after, dict):
            lines += differences(before, after, f"{prefix}{key}.")
        elif before != after:
            lines.append(f"{prefix}{key}: {_show(before)} -> {_show(after)}")
    return lines


def merged(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """`new`, with the conversions allowed by either run."""
    out = dict(new)
    for key in CONVERSIONS:
        out[key] = bool(new.get(key)) or bool((old or {}).get(key))
    return out


def conflict_message(out_dir: Path, lines: list[str]) -> str:
    return "\n".join(
        [
            f"{out_dir} holds outputs made with other settings ({out_dir / SETTINGS_FILE}); this run differs in:",
            *(f"  {line}" for line in lines),
            "Write to another folder, or pass --overwrite to delete those outputs and recompute every file.",
        ]
    )


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"{value[:12]}..." if len(value) == 64 else value  # a SHA-256: its start tells them apart
    return json.dumps(value, sort_keys=True)
