"""The recipe's sections about where a run goes: DeepSpeed, the local launch, Slurm. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import choice, key, require


@dataclass
class DeepSpeedSection:
    """ZeRO through the Hugging Face integration: `stage` 0 (off), 1, 2 or 3, or a JSON `config` path."""

    stage: int = key(
        0,
        "ZeRO stage: 0 (DeepSpeed off), 1, 2 or 3.",
        "train.arguments:deepspeed_config",
    )
    offload: bool = key(
        False,
        "Offload optimizer state (and parameters with stage 3) to CPU memory.",
        "train.arguments:deepspeed_config",
    )
    config: str | None = key(
        None,
        "A DeepSpeed JSON config to use instead of the generated one.",
        "train.arguments:deepspeed_config",
    )

    def check(self) -> None:
        choice("deepspeed.stage", self.stage, (0, 1, 2, 3))
        require(not (self.offload and self.stage == 0), "deepspeed.offload", self.offload, "false when stage is 0")


@dataclass
class LaunchSection:
    """Local launch: processes per node; `cpu: true` runs N gloo processes without GPUs."""

    nproc_per_node: int | None = key(
        None,
        "Local processes; null = one per visible GPU (1 in CPU mode).",
        "launch.local:plan_local",
    )
    cpu: bool = key(
        False,
        "CPU mode: gloo processes with the GPUs hidden (locally and in Slurm jobs).",
        "launch.local:plan_local",
    )
    master_port: int = key(
        29500,
        "Kept for recipes that set it; local runs use `torchrun --standalone` (a free port).",
        "",
    )

    def check(self) -> None:
        require(1 <= self.master_port <= 65535, "launch.master_port", self.master_port, "a port in [1, 65535]")
        require(
            self.nproc_per_node is None or self.nproc_per_node >= 1,
            "launch.nproc_per_node",
            self.nproc_per_node,
            "null (one per GPU) or an integer >= 1",
        )


@dataclass
class SlurmSection:
    """Slurm batch settings used with `--gpus N`."""

    gpus_per_node: int = key(
        8,
        "GPUs per node; `--gpus N` asks for N / gpus_per_node nodes (or one node if N is smaller).",
        "launch.cli:_launch",
    )
    job_name: str = key(
        "silkie-dpo",
        "`#SBATCH --job-name`.",
        "launch.slurm:sbatch_options",
    )
    partition: str | None = key(
        None,
        "`#SBATCH --partition`; null = the cluster default.",
        "launch.slurm:sbatch_options",
    )
    account: str | None = key(
        None,
        "`#SBATCH --account`; null = the user's default.",
        "launch.slurm:sbatch_options",
    )
    qos: str | None = key(
        None,
        "`#SBATCH --qos`; null = the default.",
        "launch.slurm:sbatch_options",
    )
    time: str | int = key(
        "24:00:00",
        "`#SBATCH --time` (wall-clock limit per job run; requeues get a fresh limit).",
        "launch.slurm:sbatch_options",
    )
    cpus_per_gpu: int | None = key(
        8,
        "`#SBATCH --cpus-per-gpu`; null = the cluster default.",
        "launch.slurm:sbatch_options",
    )
    mem_per_gpu: str | None = key(
        None,
        "`#SBATCH --mem-per-gpu` (e.g. `64G`); null = the cluster default.",
        "launch.slurm:sbatch_options",
    )
    constraint: str | None = key(
        None,
        "`#SBATCH --constraint` (node features, e.g. `a100`).",
        "launch.slurm:sbatch_options",
    )
    extra_sbatch: list[str] = key(
        None,
        "More sbatch options, one per item (`--exclusive` or `#SBATCH --exclusive`).",
        "launch.slurm:sbatch_options",
        factory=list,
    )
    setup: list[str] = key(
        None,
        "Shell lines run before training (e.g. `module load cuda`, `source env/bin/activate`).",
        "launch.slurm:render_script",
        factory=list,
    )
    requeue: bool = key(
        True,
        "After the warning signal: checkpoint and requeue the job (true), or checkpoint and stop.",
        "launch.slurm:sbatch_options",
    )
    signal: str = key(
        "USR1",
        "Warning signal to the batch shell before the time limit: `USR1` or `USR2`.",
        "launch.slurm:_sbatch_lines",
    )
    signal_seconds: int = key(
        300,
        "How long before the time limit the signal comes (torchrun's shutdown grace is this less up to 60 s, "
        "kept for the requeue).",
        "launch.slurm:_sbatch_lines",
    )
    rdzv_port: int | None = key(
        None,
        "Port of the c10d rendezvous on the job's first node; null = 20000 + job id % 20000 (jobs sharing a "
        "node never meet).",
        "launch.slurm:render_script",
    )

    def check(self) -> None:
        require(self.gpus_per_node >= 1, "slurm.gpus_per_node", self.gpus_per_node, "an integer >= 1")
        require(self.signal_seconds >= 1, "slurm.signal_seconds", self.signal_seconds, "an integer >= 1")
        require(
            self.cpus_per_gpu is None or self.cpus_per_gpu >= 1,
            "slurm.cpus_per_gpu",
            self.cpus_per_gpu,
            "null or an integer >= 1",
        )
        require(
            self.rdzv_port is None or 1 <= self.rdzv_port <= 65535,
            "slurm.rdzv_port",
            self.rdzv_port,
            "null (20000 + job id mod 20000) or a port in [1, 65535]",
        )
        require(
            self.signal.upper().removeprefix("SIG") in SLURM_SIGNALS,
            "slurm.signal",
            self.signal,
            "one of USR1, USR2 (SIGTERM is what scancel sends, so it cannot mean 'checkpoint and requeue')",
        )
        for name in ("job_name", "partition", "account", "qos", "time", "mem_per_gpu", "constraint", "signal"):
            _one_sbatch_line(f"slurm.{name}", getattr(self, name))
        for index, line in enumerate(self.extra_sbatch):
            _one_sbatch_line(f"slurm.extra_sbatch[{index}]", line)
        require(bool(str(self.job_name).strip()), "slurm.job_name", self.job_name, "a non-empty name")


SLURM_SIGNALS = ("USR1", "USR2")  # SIGTERM is what scancel sends: it must not mean "checkpoint and requeue"


def _one_sbatch_line(key: str, value: object) -> None:
    """A value written into an `#SBATCH` line must stay on it: a newline would start a shell line and end the
    directives (sbatch reads them only up to the first command)."""
    text = "" if value is None else str(value)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    require(bad is None, key, value, f"text without control characters (it goes into an #SBATCH line; found {bad!r})")
