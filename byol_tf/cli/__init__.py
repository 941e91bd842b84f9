"""The command-line programs (`byol-pretrain`, `byol-export`, ...): each module reads its flags and calls the library.

Each has `main(argv)` for `absl.app` and `run()`, the console-script entry
point; `scripts/*.py` are thin wrappers that run them from a checkout.
"""

import sys

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
