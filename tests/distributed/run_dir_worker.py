"""Worker for the rank-0 run-directory test, run under ``torchrun --nproc-per-node 2``.

``run_dir_worker.py OUT_DIR LOG_DIR``: every rank does what a trainer does at the start of an ``--overwrite``
run (clean orphans, look for an earlier run, clear it, drop stale references), with each removal slowed down
so that two ranks clearing at once would trip over each other; each rank logs what it removed and what it saw
when ``clear_run`` returned to ``LOG_DIR/rank<N>.json``. No torch import of its own: the barrier comes
through ``diptych.core.mesh``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    from diptych.core import checkpointing as ckpt
    from diptych.core import mesh as M
    from diptych.core.trainers import runner

    out, logs = Path(sys.argv[1]), Path(sys.argv[2])
    root = out / "checkpoints"
    removed: list[str] = []
    real_remove = ckpt.remove_atomically

    def slow_remove(path, *a, **k):
        removed.append(Path(path).name)
        time.sleep(0.05)
        return real_remove(path, *a, **k)

    ckpt.remove_atomically = slow_remove
    runner.clean_orphans(root)
    used = runner.previous_run(out, root)
    error = None
    try:
        if used:
            runner.clear_run(out, root)
        runner.clear_stale_references(root)
    except Exception as e:  # a race shows as FileNotFoundError here
        error = f"{type(e).__name__}: {e}"
    left = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"rank{os.environ['RANK']}.json").write_text(json.dumps(
        {"rank": M.process_index(), "count": M.process_count(), "main": M.is_main_process(), "used": used,
         "removed": removed, "left_after_clear": left, "metrics_after_clear": (out / "metrics.jsonl").exists(),
         "error": error}))


if __name__ == "__main__":
    main()
