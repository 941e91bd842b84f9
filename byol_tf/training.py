"""One pretraining run: validate, build, resume, fit, summarise, into a run folder (`RunDir`)."""

import dataclasses
import tempfile
import time
from typing import Optional

import keras
import tensorflow as tf
from absl import logging

from byol_tf import __version__
from byol_tf import data as data_lib
from byol_tf import backup as backups
from byol_tf import budget_run, distribute, guards, run_fit
from byol_tf.checks import check
from byol_tf.config import PretrainConfig
from byol_tf.build import build_byol
from byol_tf.optim import build_optimizer
from byol_tf.plots import plot_run
from byol_tf.precision import float32_copy, global_policy, resolve_precision
from byol_tf.resume import check_out_dir, check_resume, remove, resume_backup, truncate_metrics
from byol_tf.run_dir import RunDir
from byol_tf.run_eval import eval_data, knn_eval, load_source, probe_classes, random_init_encoder

__all__ = [
    "run_pretraining",
    "check_out_dir",
    "check_resume",
    "load_source",
    "eval_data",
    "knn_eval",
    "random_init_encoder",
    "probe_classes",
]


@dataclasses.dataclass
class _Run:
    """What the steps of one run share."""

    config: PretrainConfig
    train: data_lib.Source
    eval_set: data_lib.Source
    run: RunDir  # where the chief writes
    out: RunDir  # the user's run folder (backups are read from it on every worker)
    strategy: tf.distribute.Strategy
    steps: int
    run_info: dict
    backup: dict = None  # the backup resumed from
    start_step: int = 0
    started: float = 0.0  # time.time() at the start of the run (a time budget counts from it)
    plan: object = None  # a `budget.Plan` when the run has a time budget
    knn_at_start: float = None  # kNN of the step-0 (random-init) encoder, measured by a budgeted run
    knn_every: int = 1  # epochs between kNN checks (a time budget's plan may choose it)
    knn_every_given: bool = True

    @property
    def total_steps(self) -> int:
        """The run's steps: the epochs', or a time budget's plan (whose last epoch may be partial)."""
        return self.steps * self.config.epochs if self.plan is None else self.plan.total_steps

    @property
    def workers(self):
        return distribute.input_pipelines(self.strategy)


def _validate(
    config, train, eval_set, out_dir, strategy, overwrite, backup_every_steps, on_collapse, collapse_patience
):
    """Every check that needs no model; returns the run's shared state, its backup found."""
    check_out_dir(out_dir, overwrite)
    train = data_lib.open_source(train)
    eval_set = None if eval_set is None else data_lib.open_source(eval_set)
    for name, source in (("data", train), ("eval_set", eval_set)):
        if source is not None and getattr(source, "modality", "image") != config.modality:
            raise ValueError(
                f"The run is {config.modality} (config.modality) but `{name}` holds "
                f"{getattr(source, 'modality', 'image')} examples. Received: {name}={source.name!r}"
            )
    if eval_set is not None and not train.labelled:
        raise ValueError(
            "kNN evaluation uses the training images as memory, so they need labels. "
            f"Received: data={train.name!r} (unlabelled)"
        )
    if config.probe and not train.labelled:
        raise ValueError(
            f"The online linear probe (probe=True) trains on labels. Received: data={train.name!r} (unlabelled)"
        )
    if on_collapse not in ("stop", "warn"):
        raise ValueError(f"`on_collapse` must be 'stop' or 'warn'. Received: on_collapse={on_collapse!r}")
    if collapse_patience < 1:
        raise ValueError(f"`collapse_patience` must be >= 1. Received: collapse_patience={collapse_patience!r}")
    if backup_every_steps is not None and backup_every_steps < 1:
        raise ValueError(f"`backup_every_steps` must be >= 1. Received: backup_every_steps={backup_every_steps!r}")
    strategy = strategy or tf.distribute.get_strategy()
    distribute.check_global_batch(config.batch_size, strategy)
    distribute.check_steps_per_execution(config.steps_per_execution, strategy)
    steps = data_lib.steps_per_epoch(train.num_examples, config.batch_size)
    if steps < 1:
        raise ValueError(
            f"Not enough images for one batch: {train.num_examples} images in {train.name}. "
            f"Received: batch_size={config.batch_size}"
        )
    data_lib.check_decodable(train)
    run_info = {
        "data": train.name,
        "num_train_images": train.num_examples,
        "steps_per_epoch": steps,
        "total_steps": steps * config.epochs,
        "replicas": strategy.num_replicas_in_sync,
        "workers": distribute.input_pipelines(strategy)[0],
    }
    backup = resume_backup(out_dir, config, run_info, overwrite)
    # Only the chief writes the run folder; other workers of a multi-worker cluster
    # write to a temporary folder deleted at the end (they read the chief's backup).
    run = RunDir(out_dir if distribute.is_chief() else tempfile.mkdtemp(prefix="byol_worker_"))
    return _Run(config, train, eval_set, run, RunDir(out_dir), strategy, steps, run_info, backup)


def _build(r, sync_bn, backbone, jit_compile, deterministic):
    """The compiled model, under the strategy, from the run's seed."""
    replicas = r.strategy.num_replicas_in_sync
    print(f"strategy={type(r.strategy).__name__} replicas={replicas}", flush=True)
    logging.info("strategy=%s replicas=%d", type(r.strategy).__name__, replicas)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(r.config.seed)
    with r.strategy.scope():
        model = build_byol(
            r.config,
            replicas if sync_bn else 1,
            backbone=backbone,
            probe_classes=probe_classes(r.train, r.eval_set) if r.config.probe else None,
            train=r.train,
        )
        model.compile(
            optimizer=build_optimizer(r.config, r.steps),
            steps_per_execution=r.config.steps_per_execution,
            jit_compile=jit_compile,
        )
    return model


def _resume(r, model):
    """Restores the backup into `model` (or clears an older run's records), then writes the config."""
    if r.backup is None:
        if distribute.is_chief():
            # A fresh start (nothing to resume, or --overwrite): no stale records of an older run.
            for path in r.run.fresh_start_files():
                remove(path)
    else:
        with r.strategy.scope():
            r.backup = backups.restore_backup(model, r.out.backup_dir, model.online_trainable_variables)
        r.start_step = int(r.backup["step"])
        if distribute.is_chief():
            truncate_metrics(r.run.metrics_file, r.start_step // r.steps)
        message = f"Resumed from step {r.start_step} (backup in {r.out.backup_dir})"
        print(message, flush=True)
        logging.info(message)
    # Only now, with the model built, does the run folder appear.
    r.run.write_config(r.config)


def _summarise(r, model, history, state, train_seconds, compare_random_init):
    """Writes `summary.json`, the encoder and the plots; returns the summary."""
    config, train = r.config, r.train
    steps_done = guards.optimizer_step(model)
    summary = {
        "version": __version__,
        "status": state.status,
        "preset": config.preset,
        "modality": config.modality,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "view_size": config.train_size if config.modality == "image" else None,
        "steps": steps_done,
        "total_steps": r.total_steps,
        "resumed_from_step": r.start_step if r.backup else None,
        "train_seconds": round(train_seconds, 1),
        "time_budget": config.time_budget,
        "plan": None if r.plan is None else dataclasses.asdict(r.plan),
        "images_per_sec": round((steps_done - r.start_step) * config.batch_size / max(train_seconds, 1e-9), 1),
        "num_train_images": train.num_examples,
        "num_skipped": sum(distribute.gather_from_workers(r.strategy, train.num_skipped)),
        # This worker's (every worker logs its own); `num_skipped` counts them all.
        "skipped_files": [list(item) for item in train.skips.items()[:100]],
        "strategy": type(r.strategy).__name__,
        "dtype_policy": keras.mixed_precision.global_policy().name,  # what "auto" resolved to
        "replicas": r.strategy.num_replicas_in_sync,
        "final": {k: float(v[-1]) for k, v in history.items() if len(v)},
    }
    if state.stopped:
        summary.update(message=state.message, last_good=state.last_good)
        print(f"{state.message} {state.good_checkpoint_text()}", flush=True)
        logging.error("%s %s", state.message, state.good_checkpoint_text())
    else:
        # Saved in float32 whatever the run's precision (weights are float32 in every policy).
        float32_copy(model.encoder).save(r.run.encoder_file)
        if r.eval_set is not None:
            # The monitor always evaluates the last epoch; reuse it rather than embed twice.
            knn_history = history.get("knn_acc", [])
            summary["knn_acc"] = (
                float(knn_history[-1]) if knn_history else knn_eval(model.encoder, config, train, r.eval_set)
            )
            if r.knn_at_start is not None:
                summary["knn_acc_random_init"] = r.knn_at_start  # a budgeted run measured it at step 0
            elif compare_random_init:
                summary["knn_acc_random_init"] = knn_eval(random_init_encoder(config, train), config, train, r.eval_set)
            logging.info(
                "kNN top-1 (k=200): %.4f learned, %s at random init",
                summary["knn_acc"],
                summary.get("knn_acc_random_init", "n/a"),
            )
    summary["run_seconds"] = round(time.time() - r.started, 1)  # what a time budget holds (plots follow)
    if r.plan is not None:
        budget_run.log(
            f"Time budget: the run took {summary['run_seconds']:.0f} s of its {r.plan.time_budget_s:.0f} s "
            f"({100 * summary['run_seconds'] / r.plan.time_budget_s:.1f}%) before the plots"
        )
    backups.atomic_json(r.run.summary_file, summary)
    if distribute.is_chief():
        try:
            plot_run(
                r.run.path,
                None if state.stopped else r.eval_set,
                encoder=model.encoder,
                crop_fraction=config.eval_crop_fraction,
                batches=None if config.modality == "image" or r.eval_set is None else eval_data(r.eval_set, config),
            )
        except Exception as error:  # A plotting failure must not fail a finished run.
            logging.warning("Plots failed: %s", error)
    if not state.stopped:
        # Finished: the backup has served its purpose. A stopped run keeps its last good backup.
        remove(r.run.backup_dir)
    if r.run.path != r.out.path:
        remove(r.run.path)
    return summary


def run_pretraining(
    config: PretrainConfig,
    train,
    out_dir: str,
    eval_set=None,
    knn_every: Optional[int] = None,
    backup_every_steps: Optional[int] = None,
    compare_random_init: bool = True,
    verbose: int = 2,
    overwrite: bool = False,
    autotune: bool = True,
    strategy: Optional[tf.distribute.Strategy] = None,
    jit_compile="auto",
    sync_bn: bool = True,
    deterministic: bool = False,
    collapse_threshold: Optional[float] = None,
    collapse_patience: int = 50,
    on_collapse: str = "stop",
    backbone: Optional[keras.Model] = None,
    callbacks: Optional[list] = None,
    started: Optional[float] = None,
) -> dict:
    """Pretrains BYOL on `train` and writes the run folder, resuming from its backup if there is one.

    Args:
        config: a `byol_tf.config.PretrainConfig`.
        train: the training examples: a `data.Source` (`data.open_source`),
            an `ImageSet`, or for audio and text an `ExampleSet`
            (`load_source`, `modalities.open_examples`).
        out_dir: the run folder (`RunDir`).
        eval_set: optional labelled source for kNN; the memory is `train`,
            which must then be labelled.
        knn_every: run the kNN monitor every this many epochs (and after
            the last). Default: every epoch; with a time budget, as often as
            `byol_tf.budget.KNN_SHARE` of the budget allows (the plan chooses).
        backup_every_steps: back up for resume every this many steps
            (default: every epoch). A rerun with the same configuration
            resumes from the newest backup, mid-epoch included, exactly.
        compare_random_init: at the end, also report the kNN accuracy of the
            same backbone at random init.
        verbose: `fit` verbosity.
        overwrite: replace a finished run in `out_dir`.
        autotune: tf.data autotuning (see `data.pretrain_dataset`).
        strategy: a `tf.distribute.Strategy` (default: the current one).
        jit_compile: passed to `compile`.
        sync_bn: synchronise BatchNorm across replicas when there are several.
        deterministic: `tf.config.experimental.enable_op_determinism()`, so
            that a run (and a killed-and-resumed run) is bit-reproducible.
        collapse_threshold: per-batch `collapse_std` below which the
            collapse guard counts a step as collapsed; default
            `0.1 / sqrt(projection_dim)` (a tenth of the healthy value);
            0 turns the guard off.
        collapse_patience: consecutive collapsed steps before acting.
        on_collapse: "stop" or "warn".
        backbone: optional `keras.Model` to use instead of `config.backbone`.
        callbacks: extra Keras callbacks, run after the guards.
        started: the `time.time()` a time budget counts from (default: now;
            `byol-pretrain` passes its process's start, so that the budget
            holds the whole command).

    Returns:
        The summary dict that is also written to `summary.json`; its
        `status` is "finished", "stopped_nan" or "stopped_collapse".
    """
    started = time.time() if started is None else started
    if knn_every is not None:
        check(isinstance(knn_every, int) and knn_every >= 1, "knn_every", knn_every, "must be an integer >= 1")
    r = _validate(
        config, train, eval_set, out_dir, strategy, overwrite, backup_every_steps, on_collapse, collapse_patience
    )
    r.started = started
    r.knn_every, r.knn_every_given = knn_every or 1, knn_every is not None
    policy = resolve_precision(config.precision)
    print(f"precision={config.precision} dtype_policy={policy}", flush=True)
    logging.info("precision=%s dtype_policy=%s", config.precision, policy)
    # The caller gets its own global policy back.
    with global_policy(policy):
        model = _build(r, sync_bn, backbone, jit_compile, deterministic)
        _resume(r, model)
        if config.time_budget:
            budget_run.resumed_plan(r, model)
        tracker, position_fn = run_fit.stream_tracker(r)
        state = guards.GuardState()
        # Looked up on the module, so that a test can add a callback after all of them.
        callback_list = run_fit.run_callbacks(
            r,
            state,
            position_fn,
            backup_every_steps,
            collapse_threshold,
            collapse_patience,
            on_collapse,
            callbacks,
        )
        start = time.time()
        history = run_fit.fit_run(r, model, callback_list, state, tracker, position_fn is not None, verbose, autotune)
        return _summarise(r, model, history, state, time.time() - start, compare_random_init)
