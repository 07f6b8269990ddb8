"""torchrun for local launches and Slurm jobs (run by path, so it needs torch only): a worker that stopped on bad input
has printed its one-line error and written `<working>/ERROR`; then this exits with 2 instead of printing torchrun's
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


class _SaidElsewhere(logging.Filter):
    """Drops torchrun's lines about what the launcher (or the Slurm script) reports itself: "failed (exitcode: ...)"
    once a worker has written its input error, and the shutdown steps after a signal ("Received 2 death signal",
    "Sending process ... closing signal"), whose outcome is said in one line."""

    SIGNAL_STEPS = ("Received %s death signal", "Sending process %s closing signal", "Closing process %s via signal")

    def __init__(self, working: Path | None):
        super().__init__()
        self.working = working

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(self.SIGNAL_STEPS):
            return False
        reported = self.working is not None and (self.working / ERROR_NAME).is_file()
        return not (reported and message.startswith("failed (exitcode"))


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    working = _working(sys.argv)
    for name in ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api"):
        logging.getLogger(name).addFilter(_SaidElsewhere(working))
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
