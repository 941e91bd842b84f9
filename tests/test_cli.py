"""The console commands: installed by `pip install .`, run from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "byol-pretrain": "--preset",
    "byol-export": "--run_dir",
    "byol-linear-eval": "--label_fraction",
    "byol-finetune": "--run_dir",
    "byol-plot": "--eval_data",
    "byol-make-shards": "--shard_size",
}


@pytest.mark.parametrize("command, flag", sorted(COMMANDS.items()))
def test_each_command_runs_from_any_directory_and_lists_its_flags(tmp_path, command, flag):
    path = os.path.join(os.path.dirname(sys.executable), command)
    if not os.path.exists(path):
        pytest.skip(f"{command} is not installed in this environment (pip install -e .)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([path, "--helpshort"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    # absl's help exits with status 1.
    assert "USAGE" in result.stdout and flag in result.stdout, result.stderr[-2000:]


def test_the_wheel_has_every_package_and_command(tmp_path):
    # A copy of the sources: building writes build/ next to pyproject.toml.
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), source)
    shutil.copy(os.path.join(ROOT, "README.md"), source)
    shutil.copytree(os.path.join(ROOT, "byol_tf"), source / "byol_tf", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    with zipfile.ZipFile(tmp_path / wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for module in ("byol_tf/model.py", "byol_tf/data/pipeline.py", "byol_tf/cli/pretrain.py", "byol_tf/py.typed"):
        assert module in names, module
    for command in COMMANDS:
        assert f"{command} = byol_tf.cli." in entry_points, command


def test_library_errors_name_the_flags_the_user_typed():
    from absl import app

    from byol_tf.cli import flag_errors, flag_message

    names = {"data": "eval_data", "out_dir": "out", "batch_size": "batch_size"}
    # Whole argument names only: `eval_data=` and an existing `--data=` stay as they are.
    assert (
        flag_message("bad. Received: data='x', eval_data=1, --data=2, out_dir='/o', batch_size=7", names)
        == "bad. Received: --eval_data='x', eval_data=1, --data=2, --out='/o', --batch_size=7"
    )
    with pytest.raises(app.UsageError, match=r"^`shard_size` must be >= 1\. Received: --shard_size=0$"):
        with flag_errors("shard_size"):
            raise ValueError("`shard_size` must be >= 1. Received: shard_size=0")
    with pytest.raises(KeyError):  # only ValueErrors are the user's to fix
        with flag_errors("shard_size"):
            raise KeyError("shard_size=0")


def test_process_started_counts_the_time_before_our_code_runs():
    # A second of sleep before the import: the budget's clock must include it (and the import).
    code = "import time; time.sleep(1); from byol_tf.cli import process_started; print(time.time() - process_started())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 1.0 <= float(result.stdout.strip().splitlines()[-1]) < 60
