"""`silkie annotate sample --gpus N`: the pool answers on Slurm, one shard per task, merged at the end; against the
real one-node cluster of .ci/setup_slurm.sh (2 CPU tasks standing in for 2 GPUs). The answers are those a single
process gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from silkie.tools.annotate.files import read_jsonl

from .data_fixtures import synthetic_instructions, write_jsonl
from .slurm_cluster import cancel_jobs, ensure_cluster, launcher_env, stop_cluster


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from silkie.dev.tiny_hf_vlm import build_tiny_llava, build_tiny_qwen2_vl

    root = tmp_path_factory.mktemp("slurm-annotate")
    write_jsonl(root / "instructions.jsonl", synthetic_instructions(root, n=6, seed=1))
    (root / "pool.yaml").write_text(
        f"models:\n  - {{path: {build_tiny_qwen2_vl(root / 'qwen2-vl')}, max_new_tokens: 6, temperature: 0}}\n"
        f"  - {{path: {build_tiny_llava(root / 'llava')}, max_new_tokens: 6, batch_size: 2}}\n"
        "answers_per_instruction: 2\ndevice: cpu\n"
        "slurm: {gpus_per_node: 2, cpus_per_gpu: 1, time: '00:10:00'}\n"
    )
    return root


def sample(folder: Path, out: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "silkie", "annotate", "sample", "--pool", str(folder / "pool.yaml")]
    command += [
        "--instructions",
        str(folder / "instructions.jsonl"),
        "--images",
        str(folder / "vlf" / "merged_images.zip"),
    ]
    command += ["--out", str(out), "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=launcher_env(), cwd=folder)


def test_dry_run_script_has_one_task_per_gpu(folder, tmp_path):
    result = sample(folder, tmp_path / "out", "--gpus", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --gres=gpu:2\n" in script
    assert "#SBATCH --job-name=silkie-annotate\n" in script
    assert f"#SBATCH --output={tmp_path / 'out' / 'slurm'}/%j.log" in script
    assert '--shard "$SLURM_PROCID/$SLURM_NTASKS"' in script
    assert script.rstrip().endswith(f"--out {tmp_path / 'out'} --no-progress")  # the merge step
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    refused = sample(folder, tmp_path / "out", "--gpus", "2", "--processes", "2")
    assert refused.returncode == 2 and "leave out --processes" in refused.stderr


def test_bad_slurm_key_in_the_pool_is_one_line(folder, tmp_path):
    pool = tmp_path / "pool.yaml"
    pool.write_text((folder / "pool.yaml").read_text().replace("gpus_per_node: 2", "gpus_per_node: 0"))
    command = [sys.executable, "-m", "silkie", "annotate", "sample", "--pool", str(pool), "--instructions", "x"]
    result = subprocess.run([*command, "--images", "y", "--out", str(tmp_path / "o"), "--gpus", "2", "--dry-run"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {pool}: slurm.gpus_per_node")


def test_sampling_on_slurm_matches_one_process(folder, tmp_path):
    started, reason = ensure_cluster()
    if reason:
        pytest.skip(reason)
    try:
        result = sample(folder, tmp_path / "slurm", "--gpus", "2", "--wait")
        job = json.loads(result.stdout[result.stdout.rindex('{\n  "job"') :])
        cancel_jobs([job["job"]])
        assert result.returncode == 0, result.stdout + result.stderr
        assert job["state"] == "COMPLETED" and job["merged"] is True
        log = Path(job["log"]).read_text()
        assert log.count('"new": 6') == 2, log  # each of the 2 tasks answered its 3 instructions x 2 models
        assert not list((tmp_path / "slurm").glob("answers.shard-*"))
    finally:
        if started:
            stop_cluster()
    local = sample(folder, tmp_path / "local")
    assert local.returncode == 0, local.stderr
    on_slurm = sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(tmp_path / "slurm" / "answers.jsonl"))
    alone = sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(tmp_path / "local" / "answers.jsonl"))
    assert len(on_slurm) == 12 and on_slurm == alone
