"""Real two-process data-parallel training on the CPU (gloo, launched with torchrun): both ranks take part and the
weights equal those of one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddp_train import SAMPLES

SCRIPT = Path(__file__).with_name("ddp_train.py")
ROOT = SCRIPT.parent.parent


def train(kind: str, out: Path, processes: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = out.with_name(out.name + "-logs")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "--redirects", "3", "--log-dir", str(logs)]
    command = launcher + [str(SCRIPT), kind, str(out), str(SAMPLES // processes)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        ranks = "\n".join(f"--- {path}\n{path.read_text()[-3000:]}" for path in sorted(logs.rglob("stderr.log")))
        pytest.fail(f"torchrun failed:\n{result.stderr[-3000:]}\n{ranks}")


@pytest.mark.parametrize("kind", ["m2-gpt", "m2-bert"])
def test_two_gloo_ranks_train_like_one_process_with_the_global_batch(kind, tmp_path):
    train(kind, tmp_path / "one", 1)
    train(kind, tmp_path / "two", 2)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 and "DISTRIBUTED" in r["parallel_mode"] for r in ranks)
    # Each of the 4 steps covers the whole data set, split between the ranks.
    assert all(len(r["seen"]) == 4 * SAMPLES // 2 for r in ranks)
    for step in range(4):
        halves = [set(r["seen"][step * SAMPLES // 2 : (step + 1) * SAMPLES // 2]) for r in ranks]
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(SAMPLES))
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert single["world_size"] == 1 and len(single["seen"]) == 4 * SAMPLES
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    initial = load_file_of_initial(kind, tmp_path)
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(one[name], initial[name])
    assert moved > len(one) // 2  # training changed the weights


def load_file_of_initial(kind: str, tmp_path: Path) -> dict:
    from ddp_train import build

    model = build(kind)
    model.save_pretrained(tmp_path / "initial")
    return load_file(tmp_path / "initial" / "model.safetensors")


def test_an_example_runs_unchanged_under_torchrun(tmp_path):
    from test_text_examples import TINY_TRAINING, accuracy_of_saved_model, review_files, write_checkpoint

    checkpoint = write_checkpoint("monarch", tmp_path)
    output = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "finetune_text_classification.py"), "--model_name_or_path", str(checkpoint),
               "--output_dir", str(output), *review_files(tmp_path), *TINY_TRAINING, "--use_cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((output / "results.json").read_text())
    assert report["processes"] == 2
    assert accuracy_of_saved_model(output, tmp_path / "dev.csv") == pytest.approx(report["accuracy"], abs=1e-6)
