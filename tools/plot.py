"""Plot kNN accuracy against timed seconds and against epochs for one or more run logs, as a PNG.

    python tools/plot.py logs/*.json -o curves.png                 # both panels: vs timed seconds and vs epoch
    python tools/plot.py A.json B.json -o race.png --x seconds --target 90

Each log is one line, its kNN checks as points; runs are labelled by what sets them apart (the config fields in
which they differ, and the seed), or by run_id when nothing does. The dashed line is the target (90% by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from compare import KNN_SETS, CompareError, OneLineParser, differing_keys, knn_name, load_log  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

X_AXES = {"seconds": ("timed_seconds", "timed seconds"), "epochs": ("epoch", "epoch")}


def labels_for(logs: Sequence[dict]) -> list[str]:
    """The config fields that vary across the logs, then the seed; run_id if the logs share both."""
    varying = sorted({k for log in logs[1:] for k in differing_keys(logs[0]["config"], log["config"])})
    labels = []
    for log in logs:
        parts = [f"{k}={log['config'].get(k)}" for k in varying] + [f"seed {log['config'].get('seed')}"]
        labels.append(", ".join(parts))
    if len(set(labels)) < len(labels):
        return [str(log.get("run_id", log["_path"])) for log in logs]
    return labels


def draw(logs: Sequence[dict], x: str = "both", target: float = 90.0) -> Figure:
    """The figure: one panel per x axis, one line per log through its kNN checks, the target as a dashed line."""
    axes_names = ["seconds", "epochs"] if x == "both" else [x]
    fig, axes = plt.subplots(1, len(axes_names), figsize=(6.5 * len(axes_names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], axes_names):
        key, xlabel = X_AXES[name]
        for log, label in zip(logs, labels_for(logs)):
            checks = [row for row in log["epochs"] if row.get("knn_pct") is not None]
            ax.plot([row[key] for row in checks], [row["knn_pct"] for row in checks], marker="o", markersize=3,
                    label=label)
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}%")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{knn_name(logs)} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    devices = sorted({str(log.get("environment", {}).get("gpu_name") or log.get("environment", {}).get("device"))
                      for log in logs})
    fig.suptitle(f"{knn_name(logs)} {KNN_SETS}: {len(logs)} run{'s' if len(logs) > 1 else ''} "
                 f"({', '.join(devices)})")
    fig.tight_layout()
    return fig


def plot(logs: Sequence[dict], out: str, x: str = "both", target: float = 90.0) -> None:
    """Write the figure to `out` (PNG unless its extension names another format), creating its folder. Via a temp file
    and a rename, so a failed write never leaves a half-written image in place of an older one; the temp file is
    created with mode 0o666 so that the umask, as for any file the user creates, sets the image's permissions."""
    fig = draw(logs, x, target)
    folder = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(folder, f".tmp_{uuid.uuid4().hex}.plot")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format=os.path.splitext(out)[1].lstrip(".").lower() or "png", dpi=120)
            os.replace(tmp, out)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as error:  # name the image, not the temp file
        why = f"{folder} is a file, not a folder" if isinstance(error, FileExistsError) else error.strerror or error
        raise CompareError(f"cannot write {out}: {why}") from None
    finally:
        plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="plot", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("logs", nargs="+", help="run logs written by airbench_ssl.py")
    parser.add_argument("-o", "--out", required=True, help="PNG file to write (its folder is created)")
    parser.add_argument("--x", choices=("seconds", "epochs", "both"), default="both", help="x axis")
    parser.add_argument("--target", type=float, default=90.0, help="the horizontal target line, in %%")
    args = parser.parse_args(argv)
    try:
        logs = [load_log(path) for path in args.logs]
        if not any(row.get("knn_pct") is not None for log in logs for row in log["epochs"]):
            raise CompareError("none of the logs has a kNN check to plot")
        plot(logs, args.out, args.x, args.target)
    except (CompareError, ValueError) as error:  # ValueError: matplotlib knows no such image format
        print(f"plot: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
