"""Ray Data progress off a pipe: one line per dataset per interval instead of Ray's ~15-line block.

When stdout is not a terminal Ray 2.60 logs a block per dataset every 10 s (totals, resource use,
each operator with its queue summary). `install_compact_progress` swaps in a manager that logs
`raylib.progress.stage_line` (rows done, rate, time left) plus each operator's output rows on one
line; on a terminal Ray's own bars are kept. Ray glue: it patches Ray Data's internal progress
hook (ray 2.60 is pinned), the formatting is raylib.progress's.
"""

from __future__ import annotations

import sys
import time

from raylib.progress import stage_line


def _manager_class():
    from ray.data._internal.execution.operators.input_data_buffer import InputDataBuffer
    from ray.data._internal.progress.logging_progress import LoggingExecutionProgressManager

    class CompactProgress(LoggingExecutionProgressManager):
        """Ray's non-TTY manager, logging one line per refresh interval."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._start = time.time()

        def refresh(self) -> None:
            now = self._get_time()
            if now - self._last_log_time < self.LOG_REPORT_INTERVAL_SEC:
                return
            self._last_log_time = now
            g = self._global_progress_metric
            ops = [f"{s.op.name} {s.op.metrics.row_outputs_taken:,}" for s in self._topology.values()
                   if not isinstance(s.op, InputDataBuffer)]
            line = stage_line(self._dataset_id, int(g.completed), g.total, now - self._start)
            print(f"{line} | {' -> '.join(ops)}", file=sys.stderr, flush=True)

    return LoggingExecutionProgressManager, CompactProgress


def install_compact_progress() -> None:
    """Make this process's Ray Data executions log compact progress lines when not on a TTY."""
    import ray.data._internal.execution.streaming_executor as executor

    if getattr(executor.get_progress_manager, "raylib_compact", False):
        return
    original = executor.get_progress_manager
    logging_cls, compact_cls = _manager_class()

    def get_progress_manager(ctx, dataset_id, topology, verbose_progress):
        manager = original(ctx, dataset_id, topology, verbose_progress)
        if type(manager) is logging_cls:
            return compact_cls(dataset_id, topology, ctx.enable_operator_progress_bars, verbose_progress)
        return manager

    get_progress_manager.raylib_compact = True
    executor.get_progress_manager = get_progress_manager
