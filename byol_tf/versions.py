"""TF Serving's versioned layout: `out_dir/<N>/` folders, never overwritten, each written atomically.

A `<model>-N.keras` copy sits next to version `N`; TF Serving ignores it (only
integer-named folders are versions), as it ignores the hidden temporary
folder a version is written into.
"""

import numbers
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

_VERSION_DIR = re.compile(r"^[0-9]+$")
# Any `<model>-N.keras` copy (encoder-N, classifier-N) claims version N.
_KERAS_FILE = re.compile(r"^[A-Za-z_]+-([0-9]+)\.keras$")


def keras_path(out_dir: str, version, name: str = "encoder") -> str:
    """The `.keras` copy of version `version`, next to the version folders."""
    return os.path.join(out_dir, f"{name}-{int(version)}.keras")


def existing_versions(out_dir: str) -> list:
    """The versions present in `out_dir`: integer folders or `<model>-N.keras` files."""
    if not os.path.isdir(out_dir):
        return []
    versions = set()
    for name in os.listdir(out_dir):
        if _VERSION_DIR.match(name) and os.path.isdir(os.path.join(out_dir, name)):
            versions.add(int(name))
        match = _KERAS_FILE.match(name)
        if match:
            # An orphaned .keras file (an export that died halfway) still claims its number.
            versions.add(int(match.group(1)))
    return sorted(versions)


def next_version(out_dir: str, version) -> int:
    """`version` checked (an integer >= 1, not present in `out_dir`), or the next free one."""
    existing = existing_versions(out_dir)
    if version is None:
        return max(existing, default=0) + 1
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1:
        raise ValueError(f"`version` must be an integer >= 1. Received: version={version!r}")
    version = int(version)
    if version in existing or os.path.exists(os.path.join(out_dir, str(version))):
        raise ValueError(
            f"Version {version} already exists in {out_dir!r} and is never overwritten; "
            f"leave `version` unset for the next free one ({max(existing, default=0) + 1}). Received: version={version}"
        )
    return version


def write_version(
    out_dir: str,
    version: int,
    write_saved_model_to: Callable[[str], object],
    write_keras_to: Optional[Callable[[str], object]] = None,
    keras_name: str = "encoder",
) -> str:
    """Writes `out_dir/<version>/` (and `<keras_name>-<version>.keras`) atomically.

    Both are written into a hidden temporary folder in `out_dir` and renamed
    into place, so TF Serving, which may be watching `out_dir`, never sees a
    half-written version; an existing version is never replaced.

    Args:
        out_dir: the model's base folder (TF Serving's `--model_base_path`).
        version: from `next_version`.
        write_saved_model_to: writes the SavedModel into the folder it is given.
        write_keras_to: writes the `.keras` copy to the path it is given; `None`: no copy.
        keras_name: the copy's name before `-<version>.keras`.

    Returns:
        The version folder.
    """
    version_dir = os.path.join(out_dir, str(version))
    os.makedirs(out_dir, exist_ok=True)
    # A dot-folder: TF Serving ignores non-integer names, so it never sees this.
    tmp = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        write_saved_model_to(os.path.join(tmp, "saved_model"))
        if write_keras_to is not None:
            write_keras_to(os.path.join(tmp, "model.keras"))
        # Re-check: another export may have claimed the version meanwhile. os.rename
        # of a folder also refuses to replace a non-empty one.
        if os.path.exists(version_dir) or version in existing_versions(out_dir):
            raise ValueError(
                f"Version {version} appeared in {out_dir!r} during the export. Received: version={version}"
            )
        os.rename(os.path.join(tmp, "saved_model"), version_dir)
        if write_keras_to is not None:
            os.rename(os.path.join(tmp, "model.keras"), keras_path(out_dir, version, keras_name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version_dir
