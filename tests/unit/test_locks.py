"""``file_lock``: one process at a time through a one-time set-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loupe.locks import file_lock

# Another process tries the lock without waiting: exit 0 if it got it, 1 if it is held.
_TRY = """
import fcntl, sys
with open(sys.argv[1], "w") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(1)
"""


def _another_process_gets(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", _TRY, str(path)], check=False).returncode == 0


def test_another_process_waits_while_the_lock_is_held_and_gets_it_after(tmp_path):
    path = tmp_path / "not" / "yet" / "there.lock"
    with file_lock(path):
        assert path.exists()  # its folders were made
        assert not _another_process_gets(path)
    assert _another_process_gets(path)


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    path = tmp_path / "set-up.lock"
    try:
        with file_lock(path):
            raise RuntimeError("set-up failed")
    except RuntimeError:
        pass
    assert _another_process_gets(path)
