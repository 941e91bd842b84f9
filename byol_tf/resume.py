"""Whether a run folder may be written, and whether (and from where) a run resumes in it."""

import csv
import json
import os
import shutil

from byol_tf import backup
from byol_tf.config import PretrainConfig
from byol_tf.run_dir import RunDir


def check_out_dir(out_dir, overwrite=False):
    """Refuses to reuse a folder that holds a finished (or stopped) run, unless `overwrite`."""
    path = RunDir(out_dir).summary_file
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                status = json.load(f).get("status", "finished")
        except (OSError, ValueError):
            status = "unknown"
        raise ValueError(
            f"`out` holds a finished run (status={status}); pass overwrite=True to replace it. "
            f"Received: out={out_dir!r}"
        )


def _flatten(values, prefix=""):
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old, new):
    """`[(field, old, new)]` for the fields where two config dicts differ (augment fields as `augment.NAME`)."""
    # A JSON round trip makes tuples lists on both sides.
    old, new = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _with_defaults(values):
    """A saved config dict with the fields added since it was written at their defaults.

    One that no longer parses is returned as it is, to be reported field by field.
    """
    try:
        return PretrainConfig.from_dict(values).to_dict()
    except (TypeError, ValueError):
        return values


def check_resume(out_dir, config, overwrite=False):
    """Refuses to resume `out_dir` with a configuration other than the one in its `config.json`.

    Returns True if `out_dir` holds a backup this run will resume from. With
    `overwrite`, a differing run folder is started over instead (its backup
    is ignored and replaced).
    """
    run = RunDir(out_dir)
    has_backup = backup.read_backup(run.backup_dir) is not None
    old = run.read_config_dict()
    if old is None:
        return has_backup
    differences = config_differences(_with_defaults(old), config.to_dict())
    if not differences:
        return has_backup
    if overwrite:
        return False
    listed = "; ".join(f"{k}: {a!r} in {run.config_file} vs {b!r} now" for k, a, b in differences)
    raise ValueError(
        f"Cannot resume the run in {out_dir!r} with a different configuration ({listed}). "
        f"Rerun with the same settings, choose another --out, or pass --overwrite to start over. "
        f"Received: out={out_dir!r}"
    )


def resume_backup(out_dir, config, run_info, overwrite=False):
    """The backup to resume from (`backup.read_backup`'s dict), or None to start afresh.

    Also refuses (unless `overwrite`) a backup made with other data or
    another schedule: `run_info` must match the one stored with it.
    """
    if not check_resume(out_dir, config, overwrite):
        return None
    info = backup.read_backup(RunDir(out_dir).backup_dir)
    stored = info.get("run_info", {})
    differences = [(k, stored[k], v) for k, v in run_info.items() if k in stored and stored[k] != v]
    if differences and not overwrite:
        listed = "; ".join(f"{k}: {a!r} in the backup vs {b!r} now" for k, a, b in differences)
        raise ValueError(
            f"Cannot resume the run in {out_dir!r}: its backup was made with other data ({listed}). "
            f"Use the same --data and --limit, another --out, or --overwrite to start over. Received: out={out_dir!r}"
        )
    return None if differences else info


def truncate_metrics(path, epoch):
    """Drops the rows of epochs >= `epoch` (0-based) from `metrics.csv`: a resumed run writes them again."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")
    keep = [rows[0]] + [r for r in rows[1:] if len(r) > column and r[column].isdigit() and int(r[column]) < epoch]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def remove(path):
    """Deletes a file or a folder, if there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
