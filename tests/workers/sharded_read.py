"""One worker of a 2-worker cluster: pretrains on a folder and logs every file it reads.

Run as a subprocess by tests/test_distribute.py, with TF_CONFIG set:

    python sharded_read.py FOLDER RUN_DIR OUT.json
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from byol_tf import distribute

strategy = distribute.get_strategy("multi_worker")

import tensorflow as tf

from byol_tf import get_preset
from byol_tf.data.sources import FolderSource
from byol_tf.training import run_pretraining

folder, run_dir, out = sys.argv[1:4]
reads = []


class LoggedFolder(FolderSource):
    """Notes the stream position and path of every file the training stream opens."""

    streaming = False

    def train_records(self, *args, **kwargs):
        # Called once the up-front decode check (which reads a file too) is over.
        self.streaming = True
        return super().train_records(*args, **kwargs)

    def fetch(self, record):
        def note(position, path):
            if self.streaming:
                reads.append((int(position.numpy()), path.numpy().decode()))
            return position

        position = tf.py_function(note, [record["position"], record["path"]], tf.int64)
        with tf.control_dependencies([position]):
            return tf.io.read_file(record["path"])


config = get_preset(
    "demo",
    backbone="resnet_tiny",
    image_size=16,
    batch_size=8,
    epochs=1,
    projector_hidden=16,
    projection_dim=8,
    predictor_hidden=16,
    warmup_epochs=0,
    fast_kernels=False,
)
summary = run_pretraining(config, LoggedFolder(folder), run_dir, verbose=0, strategy=strategy, autotune=False)
count, index = distribute.input_pipelines(strategy)
gathered = distribute.gather_from_workers(strategy, 2**40 + 7 * index)
with open(out, "w") as f:
    json.dump({"reads": reads, "pipelines": [count, index], "gathered": gathered, "summary": summary}, f)
