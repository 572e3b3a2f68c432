"""One job per run (Note [one job per run] in stated_client.identity): every rank of a distributed run
lands in the same job on the daemon, whatever launched it, and a restarted run finds its name again.

Real launchers on real processes: torchrun (static rendezvous, which sets TORCHELASTIC_RUN_ID=none; and
c10d with a run id), torch.multiprocessing with a tcp:// init (no $MASTER_ADDR), and a SLURM step's
environment (srun itself is not installed here: its variables are what a task sees). Each rank steps
a stated.AdamW to step 6 and must end exactly where torch.optim.AdamW does on the same tensors.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "names_worker.py")
sys.path.insert(0, HERE)

from launch import env_for, free_port, torchrun  # noqa: E402
from names_worker import STEPS, gradient, params  # noqa: E402


def run(command, env, timeout=180) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def results(out, world: int) -> list[dict]:
    found = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    assert [r["rank"] for r in found] == list(range(world))
    return found


def reference() -> list[torch.Tensor]:
    ps = params()
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    for step in range(1, STEPS + 1):
        for i, p in enumerate(ps):
            p.grad = gradient(step, i, p.shape)
        opt.step()
    return [p.detach().reshape(-1) for p in ps]


def assert_exact(found: list[dict]) -> None:
    """Each rank's parameters bit for bit torch's (the CPU kernels' parity, issue 1: same op order)."""
    want = reference()
    for r in found:
        for got, expected in zip(r["params"], want):
            assert torch.allclose(torch.tensor(got), expected, rtol=0, atol=1e-6), r["rank"]


def attached_ranks(daemon, name: str) -> list[int]:
    """The ranks the daemon's log says attached to job `name`."""
    return sorted(int(m) for m in re.findall(rf"attach job={re.escape(name)} rank=(\d+) ", daemon.log()))


def test_torchrun_static_rendezvous_gives_every_rank_one_job(daemon, tmp_path):
    """torchrun's default (static) rendezvous sets TORCHELASTIC_RUN_ID=none: the run is named after the
    rendezvous address, the same for every rank. Each rank says once which name it uses, and why."""
    port = free_port()
    done = run(torchrun("--master-addr", "127.0.0.1", "--master-port", str(port), WORKER, str(tmp_path)),
               env_for(daemon))
    found = results(tmp_path, 2)
    name = f"names_worker.py-127.0.0.1-{port}"
    assert {r["job"] for r in found} == {name}
    assert attached_ranks(daemon, name) == [0, 1]
    assert done.stderr.count("this process is job") == 2, done.stderr[-2000:]
    assert "rendezvous address" in done.stderr
    assert_exact(found)


def test_torchrun_with_a_run_id_uses_it(daemon, tmp_path):
    port = free_port()
    run(torchrun("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pretrain-7",
                 WORKER, str(tmp_path)), env_for(daemon))
    assert {r["job"] for r in results(tmp_path, 2)} == {"pretrain-7"}


def test_multiprocessing_with_a_tcp_init_shares_rank_zeros_name(daemon, tmp_path):
    """No launcher variables at all (an init_method of tcp://): rank 0 names the job and the others read
    the name from torch.distributed's store."""
    url = f"tcp://127.0.0.1:{free_port()}"
    env = env_for(daemon)
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path), "--init", url, "2", str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    found = results(tmp_path, 2)
    assert len({r["job"] for r in found}) == 1
    assert found[0]["job"] == f"names_worker.py-{procs[0].pid}"
    assert_exact(found)


def test_a_slurm_step_of_several_tasks_is_one_job(daemon, tmp_path):
    """What srun gives each task: the job and step ids, the task count and the task's rank."""
    env = env_for(daemon, SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2")
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path)], env=dict(env, SLURM_PROCID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    found = results(tmp_path, 2)
    assert {r["job"] for r in found} == {"names_worker.py-slurm-4242.0"}
    assert_exact(found)


def test_a_single_task_in_a_slurm_allocation_is_a_job_of_its_own(daemon, tmp_path):
    """A shell in salloc has the allocation's ids too; two scripts run there are two runs."""
    env = env_for(daemon, SLURM_JOB_ID="4243", SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path / str(i))], env=env, stderr=subprocess.PIPE,
                              text=True) for i in range(2) if not os.makedirs(tmp_path / str(i))]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    jobs = [json.load(open(tmp_path / str(i) / "rank0.json"))["job"] for i in range(2)]
    assert jobs == [f"names_worker.py-{p.pid}" for p in procs]


def test_an_elastic_restart_keeps_the_name_and_resumes_exactly(tmp_path, spawn):
    """torchrun --max-restarts 1: rank 1 fails after step 3, torchrun stops rank 0 and starts both again.
    The second attempt has the first's name, so resume=True finds both ranks' retained state at step 3,
    and the run ends where torch.optim.AdamW does after 6 steps."""
    daemon = spawn("elastic")
    port = free_port()
    done = run(torchrun("--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "1",
                        "--monitor-interval", "0.5", WORKER, str(tmp_path), "--crash-after", "3"),
               env_for(daemon), timeout=300)
    found = results(tmp_path, 2)
    assert {r["job"] for r in found} == {f"names_worker.py-127.0.0.1-{port}"}
    assert [r["resumed"] for r in found] == [3, 3], done.stderr[-3000:]
    assert_exact(found)
