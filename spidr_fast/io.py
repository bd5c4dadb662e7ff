"""Atomic file writes, the one way spidr_fast writes a file that others read.

`atomic_write(path, write)` has `write(tmp)` fill a temporary file beside `path`, then renames it
over `path` (`os.replace`): a reader, or a rerun after a crash, sees the old file or the new one,
never a partial one. The temporary file is created with `os.open(..., 0o666)`, so the result has
the permissions any new file gets under the process umask (0644 under umask 022), not the 0600
of `tempfile.mkstemp`: colleagues sharing the outputs can read them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

TEMP_SUFFIX = ".tmp"  # temporaries are `.{name}.{8 hex}.tmp` beside the target


def _create_temp(path: Path) -> Path:
    """A new empty file `.{name}.{random}.tmp` beside `path`, created with the umask's permissions."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Have `write(tmp_path)` write the content, then rename it to `path` (folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) to `path` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def write_failures(path: str | Path, failures: Sequence[tuple[str, str]]) -> Path:
    """A failures file: one `{"path", "reason"}` JSON object per line, written atomically."""
    return atomic_write_text(path, "".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in failures))
