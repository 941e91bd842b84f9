"""`RunDir`: every path of a pretraining run folder, and what other programs read from it.

RUN/config.json        the `PretrainConfig`
RUN/summary.json       the outcome (`status`, steps, kNN, skipped files)
RUN/metrics.csv        one row per epoch; RUN/tensorboard/ the same, live
RUN/backup/            the full training state for an exact resume
RUN/checkpoints/byol.keras   the whole model, each epoch
RUN/encoder.keras      the final online encoder
RUN/metrics.png, RUN/embedding_map.png   the plots
RUN/plan.json          a time-budgeted run's plan (`byol_tf.budget`)
"""

import dataclasses
import json
import os

from byol_tf.config import PretrainConfig


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run folder's paths, and its config, summary and encoder.

    Args:
        path: the run folder (it need not exist yet).
    """

    path: str

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"A run folder must be a path. Received: run_dir={self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))

    def _file(self, *parts):
        return os.path.join(self.path, *parts)

    config_file = property(lambda self: self._file("config.json"))
    summary_file = property(lambda self: self._file("summary.json"))
    metrics_file = property(lambda self: self._file("metrics.csv"))
    tensorboard_dir = property(lambda self: self._file("tensorboard"))
    backup_dir = property(lambda self: self._file("backup"))
    checkpoint_file = property(lambda self: self._file("checkpoints", "byol.keras"))
    encoder_file = property(lambda self: self._file("encoder.keras"))
    metrics_plot = property(lambda self: self._file("metrics.png"))
    embedding_plot = property(lambda self: self._file("embedding_map.png"))
    plan_file = property(lambda self: self._file("plan.json"))

    def fresh_start_files(self):
        """What a run that starts over removes: records of an older run."""
        return [
            self.backup_dir,
            self.metrics_file,
            self.tensorboard_dir,
            self.encoder_file,
            self.summary_file,
            self.plan_file,
        ]

    def read_config_dict(self):
        """`config.json` as written (a dict), or None when there is none."""
        if not os.path.isfile(self.config_file):
            return None
        with open(self.config_file) as f:
            return json.load(f)

    def read_config(self) -> PretrainConfig:
        """The run's `PretrainConfig` (fields added since it was written take their defaults)."""
        values = self.read_config_dict()
        if values is None:
            raise ValueError(f"Not a run folder: it has no config.json. Received: run_dir={self.path!r}")
        return PretrainConfig.from_dict(values)

    def write_config(self, config: PretrainConfig):
        os.makedirs(self.path, exist_ok=True)
        with open(self.config_file, "w") as f:
            json.dump(config.to_dict(), f, indent=2)

    def read_summary(self) -> dict:
        """`summary.json`, or `{}` when the run has none (yet)."""
        if not os.path.isfile(self.summary_file):
            return {}
        with open(self.summary_file) as f:
            return json.load(f)

    def load_encoder(self, safe_mode=True):
        """The final online encoder (`encoder.keras`)."""
        import keras

        from byol_tf import backbones, model  # noqa: F401 - registers byol-tf's layers

        if not os.path.isfile(self.encoder_file):
            raise ValueError(
                f"The run folder has no encoder.keras; is it a finished run? Received: run_dir={self.path!r}"
            )
        return keras.saving.load_model(self.encoder_file, safe_mode=safe_mode)
