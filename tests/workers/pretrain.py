"""`byol-pretrain` with a test hook: with BYOL_TF_TEST_PAUSE_AT_STEP=N it parks the run after step N.

Before parking, it writes the file named by BYOL_TF_TEST_PAUSE_MARKER, so a
test knows where the run is and can SIGKILL it there (tests of exact resume).
Without the variable it is `byol-pretrain` itself.
"""

import json
import os
import time

import keras

from byol_tf import guards, run_fit


class PauseAt(keras.callbacks.Callback):
    """Sleeps for good after optimizer step `step`, once `marker` is written."""

    def __init__(self, step, marker):
        super().__init__()
        self.step, self.marker = int(step), marker

    def on_train_batch_end(self, batch, logs=None):
        if guards.optimizer_step(self.model) == self.step:
            if self.marker:
                with open(self.marker + ".tmp", "w") as f:
                    json.dump({"step": self.step}, f)
                os.replace(self.marker + ".tmp", self.marker)
            while True:
                time.sleep(60)


if os.environ.get("BYOL_TF_TEST_PAUSE_AT_STEP"):
    pause = PauseAt(os.environ["BYOL_TF_TEST_PAUSE_AT_STEP"], os.environ.get("BYOL_TF_TEST_PAUSE_MARKER", ""))
    callbacks = run_fit.run_callbacks
    # Last, after every callback that saves: the backups before the pause are on disk.
    run_fit.run_callbacks = lambda *args, **kwargs: callbacks(*args, **kwargs) + [pause]

if __name__ == "__main__":
    from byol_tf.cli.pretrain import run

    run()
