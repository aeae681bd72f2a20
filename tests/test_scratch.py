"""The one scratch-folder scheme (fileio.scratch_folder): owner-locked, removed after use, swept after a kill."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_quantgate import fileio
from pytest_quantgate.errors import WriteError


def test_a_scratch_folder_is_locked_while_used_and_gone_after(tmp_path: Path) -> None:
    with fileio.scratch_folder("ptq-static", tmp_path) as (path, swept):
        assert swept == 0 and path.parent == tmp_path
        assert path.name.startswith(f"quantgate-ptq_static-{os.getpid()}-")
        assert (path / fileio.OWNER_LOCK).exists()
        assert fileio.sweep_scratch(tmp_path, "ptq-static") == []  # the owner lives: kept
    assert list(tmp_path.iterdir()) == []


def test_a_killed_owner_s_folder_is_swept_by_the_next_user_of_its_label(tmp_path: Path) -> None:
    code = ("import os, sys\nfrom pathlib import Path\nfrom pytest_quantgate import fileio\n"
            "with fileio.scratch_folder('diagnose', Path(sys.argv[1])) as (p, _):\n"
            "    (p / 'work.bin').write_bytes(b'x')\n    os._exit(9)  # no clean-up: as after SIGKILL\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False).returncode == 9
    (left,) = tmp_path.iterdir()
    assert fileio.sweep_scratch(tmp_path, "advise") == [] and left.exists()  # asked for another label's only
    with fileio.scratch_folder("qat", tmp_path) as (_, swept):  # whoever comes next cleans up
        assert swept == 1 and not left.exists()


def test_hidden_folders_for_work_beside_the_registry(tmp_path: Path) -> None:
    with fileio.scratch_folder("advise", tmp_path, hidden=True) as (path, _):
        assert path.name.startswith(".quantgate-advise-")


def test_a_folder_that_cannot_be_made_is_a_write_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(WriteError, match=r"nowhere/quantgate-qat-\*: cannot write the working folder"), \
            fileio.scratch_folder("qat", missing):
        pass
