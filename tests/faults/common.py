"""Helpers of the fault tests: run the CLI and read its one error line; fingerprint files to prove them intact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vlm_post.cli import main


def error_line(err: str) -> str:
    """The one ``vlm_post: error:`` (or ``vlm_post study: error:``) line of a failed command, with no traceback."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith(("vlm_post: error:", "vlm_post study: error:"))]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def run_cli(args: list[str], capsys, status: int) -> str:
    """Run ``vlm_post <args>``; assert it exits with ``status`` and one error line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == status, err[-3000:]
    return error_line(err)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: what 'intact' means in these tests."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
