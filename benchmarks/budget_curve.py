"""Accuracy against time budget: one preset pretrained to several budgets, one after another.

    python benchmarks/budget_curve.py --preset=cifar10_cpu20 --budgets=10m,20m,40m \
        --data=data/cifar10/train.npz --eval_data=data/cifar10/test.npz --out=runs/budget_curve

Each budget is a `byol-pretrain --time_budget=B` run in OUT/budget_B (its
output in OUT/budget_B.log); a budget whose run finished in an earlier
invocation (OUT/budget_B.wall_seconds) is not run again. Then
OUT/budget_curve.csv and OUT/budget_curve.png (`plots.plot_budget_curve`).
Prints one `name=value` line per run: the budget, the whole command's wall
time, the run's own (`run_seconds`, from the process's start to the summary),
their distance to the budget, the steps and the kNN accuracies.
"""

import csv
import os
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("preset", "cifar10_cpu20", "Preset to run.")
flags.DEFINE_list("budgets", ["10m", "20m", "40m"], "Time budgets, as --time_budget takes them.")
flags.DEFINE_string("data", None, "Training data (--data of byol-pretrain).")
flags.DEFINE_string("eval_data", None, "kNN evaluation data (--eval_data).")
flags.DEFINE_integer("knn_every", None, "kNN checks every N epochs (default: byol-pretrain's, planned).")
flags.DEFINE_string("out", "runs/budget_curve", "Folder of the runs, the table and the plot.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from byol_tf import plots

    os.makedirs(FLAGS.out, exist_ok=True)
    run_dirs, wall = [], {}
    for text in FLAGS.budgets:
        run_dir = os.path.join(FLAGS.out, f"budget_{text}")
        run_dirs.append(run_dir)
        command = [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "..", "scripts", "pretrain.py"),
            f"--preset={FLAGS.preset}",
            f"--time_budget={text}",
            f"--data={FLAGS.data}",
            f"--eval_data={FLAGS.eval_data}",
            f"--out={run_dir}",
        ] + ([f"--knn_every={FLAGS.knn_every}"] if FLAGS.knn_every else [])
        wall_file = run_dir + ".wall_seconds"
        if not os.path.isfile(wall_file):  # else finished by an earlier invocation
            start = time.time()
            with open(run_dir + ".log", "a") as log:
                subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
            with open(wall_file, "w") as f:
                f.write(f"{time.time() - start:.1f}\n")
        with open(wall_file) as f:
            wall[run_dir] = float(f.read())
    rows = plots.budget_rows(run_dirs)
    for row in rows:
        budget_s = row["time_budget_s"]
        row["command_seconds"] = wall[row["run_dir"]]
        for key in ("command_seconds", "run_seconds"):
            print(f"{os.path.basename(row['run_dir'])} {key}={row[key]} ({100 * (row[key] / budget_s - 1):+.1f}%)")
        print(
            f"{os.path.basename(row['run_dir'])} budget_s={budget_s:.0f} steps={row['steps']} "
            f"knn_acc={100 * row['knn_acc']:.2f} knn_acc_random_init={100 * row['knn_acc_random_init']:.2f}"
        )
    with open(os.path.join(FLAGS.out, "budget_curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"plot={plots.plot_budget_curve(rows, os.path.join(FLAGS.out, 'budget_curve.png'))}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["data", "eval_data"])
    app.run(main)
