"""The shipped accelerate configs load in accelerate's own config class, and the SLURM script composes the launch
each node needs (run with stand-ins for srun, scontrol and accelerate that record what they are given)."""

import os
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"


@pytest.mark.parametrize("name", ["fsdp2", "fsdp2_multinode", "ddp"])
def test_accelerate_reads_the_config(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == ("MULTI_GPU" if name == "ddp" else "FSDP")
    if name != "ddp":
        assert str(config.fsdp_config["fsdp_version"]) == "2"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def test_slurm_script_launches_every_node_with_its_rank(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record = tmp_path / "launch.txt"
    _stub(stubs, "scontrol", 'printf "node-a\\nnode-b\\n"')
    # srun runs the per-node command once, as node 1 would.
    _stub(stubs, "srun", 'shift; SLURM_NODEID=1 "$@"')
    _stub(stubs, "accelerate", f'printf "%s\\n" "$@" > {record}')
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "x"}
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "slurm_fsdp2.sh"), "configs/grpo/flux_hps.yaml", "optim.lr=1e-5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    args = record.read_text().splitlines()
    assert args[0] == "launch"

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert Path(value("--config_file")) == CONFIGS / "fsdp2_multinode.yaml"
    assert (value("--num_machines"), value("--num_processes"), value("--machine_rank")) == ("2", "16", "1")
    assert (value("--main_process_ip"), value("--main_process_port")) == ("node-a", "29500")
    assert args[args.index("-m") :] == [
        "-m", "diffalign.cli", "train", "configs/grpo/flux_hps.yaml", "optim.lr=1e-5", "--resume", "auto",
    ]  # fmt: skip
