"""One logging setup for the package (standard `logging`), one format: `[silkie] message` for a run's progress on
stdout, `[launch] message` for the launcher's notes on stderr (`silkie.launch.stdout`: what the user follows, on
stdout); warnings and errors get `warning: ` / `error: `. A run's messages come from rank 0 only, unless
`all_ranks`; warnings and errors from every rank. The level comes from `--log-level` or `SILKIE_LOG_LEVEL`
(inherited by the processes torchrun starts). Torch-free.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LEVEL_ENV = "SILKIE_LOG_LEVEL"
ALL_RANKS_ENV = "SILKIE_LOG_ALL_RANKS"
LEVELS = ("debug", "info", "warning", "error")
ROOT = "silkie"
LAUNCH = "silkie.launch"
LAUNCH_STDOUT = "silkie.launch.stdout"


class _Console(logging.Handler):
    """Writes to the stream that is `sys.stdout` / `sys.stderr` when the record is emitted (so a redirected or
    captured stream gets it), chosen by the logger: the launcher's notes go to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        launcher = record.name.startswith(LAUNCH) and record.name != LAUNCH_STDOUT
        stream = sys.stderr if launcher else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # a closed stream at exit must not raise out of logging
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = "launch" if record.name.startswith(LAUNCH) else "silkie"
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"[{tag}] {level}{record.getMessage()}"


class _MainRank(logging.Filter):
    """Info and debug from rank 0 only (every rank of a run logs the same progress), unless all ranks are asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or os.environ.get(ALL_RANKS_ENV) == "1":
            return True
        return os.environ.get("RANK", "0") == "0"


def configure(level: str | None = None, all_ranks: bool | None = None) -> None:
    """Set the package's level (`debug`, `info`, `warning`, `error`; default `SILKIE_LOG_LEVEL` or info) and
    whether every rank logs; also for the processes this one starts."""
    if level is not None:
        if level not in LEVELS:
            raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
        os.environ[LEVEL_ENV] = level
    if all_ranks is not None:
        os.environ[ALL_RANKS_ENV] = "1" if all_ranks else "0"
    name = os.environ.get(LEVEL_ENV, "info")
    logging.getLogger(ROOT).setLevel(getattr(logging, name.upper(), logging.INFO))


def _install() -> None:
    root = logging.getLogger(ROOT)
    if any(isinstance(handler, _Console) for handler in root.handlers):
        return
    handler = _Console()
    handler.setFormatter(_Format())
    handler.addFilter(_MainRank())
    root.addHandler(handler)
    root.propagate = False  # one line per message, whatever the application configures at the root
    configure()


_install()


def get_logger(name: str) -> logging.Logger:
    """The logger of a module of the package (`silkie...`), with the package's console set up."""
    _install()
    return logging.getLogger(name)


def ignore_known_warnings() -> None:
    """Filter the library warnings known to be noise here: peft asks a transformers 5 model for its deprecated
    `is_gradient_checkpointing` (a FutureWarning on every load of an adapter); DeepSpeed says "Setting accelerator
    to CPU" as a warning wherever it is imported without a GPU (the tools, a CPU run); accelerate warns of a
    "Gradient accumulation steps mismatch" on every DeepSpeed run that accumulates (see `_NotTrainerAccumulation`)."""
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name, noise in (("DeepSpeed", _NotCpuAccelerator), ("accelerate.accelerator", _NotTrainerAccumulation)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, noise) for f in logger.filters):
            logger.addFilter(noise())


def quiet_libraries(terminal: bool) -> None:
    """Filter what is known to be noise here (`ignore_known_warnings`), say the package's own warnings as its
    console lines (`say_own_warnings`); off a `terminal`, also hide the progress bars (`hide_progress_bars`). A
    run's console and every tool start with it."""
    ignore_known_warnings()
    say_own_warnings()
    if not terminal:
        hide_progress_bars()


def say_own_warnings() -> None:
    """Warnings of the package's own categories (e.g. a pair dropped for a broken picture, raised in a DataLoader
    worker) as `[silkie] warning: ...` lines, not Python's two-line form pointing into torch's code."""
    shown = warnings.showwarning
    if getattr(shown, "_silkie", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' signature)
        # catch_warnings(record=True) (pytest.warns too) swaps warnings' printer for a list's append
        printer = getattr(warnings, "_showwarnmsg_impl", None)
        recording = printer is not None and getattr(printer, "__name__", "") != "_showwarnmsg_impl"
        if category.__module__.startswith(f"{ROOT}.") and not recording:
            get_logger(category.__module__).warning(str(message))
        elif recording:
            warnings._showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
        else:
            shown(message, category, filename, lineno, file, line)

    show._silkie = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def on_terminal() -> bool:
    """Whether output goes to a terminal (progress bars) rather than a file or a pipe (plain lines)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def hide_progress_bars() -> None:
    """Turn off, in this process, the `\\r` progress bars of transformers (loading weights, writing shards) and
    datasets: in a log file or a pipe they are noise. (Not through environment variables, which the processes this
    one starts, e.g. a training launch on a terminal, would inherit.)"""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers reads it when it loads
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()


class _NotCpuAccelerator(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" where there is no GPU (on a GPU machine it is news)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Setting accelerator to CPU"):
            return True
        torch = sys.modules.get("torch")  # loaded wherever DeepSpeed is (this module stays torch-free)
        return torch is not None and torch.cuda.is_available()


ACCUMULATION_NOISE = "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,"


class _NotTrainerAccumulation(logging.Filter):
    """Drops accelerate's "GradientAccumulationPlugin has 1, DeepSpeed config has N": the HF Trainer sets the plugin
    to 1 on purpose (it accumulates itself) and DeepSpeed's N is the one in use, so on every run it is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ACCUMULATION_NOISE)
