"""torchrun for local launches (run by path, so it needs torch only): a worker that stopped on bad input has printed
its one-line error and written `<working>/ERROR`; then this exits with 2 instead of printing torchrun's
ChildFailedError traceback and its "failed (exitcode: 2)" log line, and a signal that stopped the run exits 128 +
its number without a traceback. Any other failure is reported by torchrun as usual."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ERROR_NAME = "ERROR"  # silkie.run_dir.ERROR_NAME (not imported: this file runs without the silkie package)
EXIT_INPUT_ERROR = 2


def _working(argv: list[str]) -> Path | None:
    """The run directory from the training script's `--working DIR` arguments."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--working":
            return Path(value)
    return None


class _ReportedFailure(logging.Filter):
    """Drops torchrun's "failed (exitcode: ...)" lines once a worker has reported its input error."""

    def __init__(self, working: Path):
        super().__init__()
        self.working = working

    def filter(self, record: logging.LogRecord) -> bool:
        reported = (self.working / ERROR_NAME).is_file()
        return not (reported and str(record.msg).startswith("failed (exitcode"))


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    working = _working(sys.argv)
    if working is not None:
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_ReportedFailure(working))
    os.environ["SILKIE_LAUNCHER_REPORTS_ERRORS"] = "1"  # the workers leave the one-line error to the launcher
    try:
        torchrun()
    except ChildFailedError:
        if working is not None and (working / ERROR_NAME).is_file():
            return EXIT_INPUT_ERROR
        raise
    except SignalException as stop:  # Ctrl-C / kill: the workers were stopped and the launcher says where things are
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while torch imports, before torchrun handles signals: nothing started yet
        sys.exit(130)
