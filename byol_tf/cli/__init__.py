"""The command-line programs (`byol-pretrain`, `byol-export`, ...): each module reads its flags and calls the library.

Each has `main(argv)` for `absl.app` and `run()`, the console-script entry
point; `scripts/*.py` are thin wrappers that run them from a checkout.
Library errors name the library's arguments (`Received: batch_size=7`);
`flag_errors` is the one place that renames them to the flags the user typed.
"""

import contextlib
import os
import re
import sys
import time

from absl import app, flags


def run_main(main, *modules):
    """Runs `main` with `absl.app`, listing the flags of `modules` in `--help`.

    absl's help lists the flags of the main module, which is the console
    script (or `scripts/*.py`), not the module that defines them.
    """
    values = flags.FLAGS
    for module in modules:
        for flag in values.get_key_flags_for_module(module):
            values.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


def flag_message(message: str, flag_for_argument: dict) -> str:
    """`message` with every `argument=` of `flag_for_argument` written as `--flag=`.

    >>> flag_message("`batch_size` must be >= 2. Received: batch_size=1", {"batch_size": "batch_size"})
    '`batch_size` must be >= 2. Received: --batch_size=1'
    """
    for argument, flag in flag_for_argument.items():
        # Whole names only: `data=` must not rewrite `eval_data=` or `--data=`.
        message = re.sub(rf"(?<![\w.-]){re.escape(argument)}=", f"--{flag}=", message)
    return message


@contextlib.contextmanager
def flag_errors(*same_names: str, **flag_for_argument: str):
    """Turns a library `ValueError` raised inside into an `app.UsageError` that names flags.

    Args:
        *same_names: arguments whose flag has the same name.
        **flag_for_argument: `argument="flag"` where the names differ.

    Example:
    >>> with flag_errors("out", encoder_path="encoder"):  # doctest: +SKIP
    ...     run_the_library()
    """
    names = {**{name: name for name in same_names}, **flag_for_argument}
    try:
        yield
    except ValueError as error:
        raise app.UsageError(flag_message(str(error), names)) from error


def process_started() -> float:
    """The `time.time()` this process started (Linux's /proc), else now: a time budget holds the whole command.

    Python has no call for it; the imports of TensorFlow before any of our code
    runs take seconds a user's clock counts.
    """
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age if 0 <= age < 3600 else time.time()
    except (OSError, ValueError, IndexError):
        return time.time()
