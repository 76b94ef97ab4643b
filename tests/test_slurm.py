"""
A real single-node SLURM on this machine (Debian's slurm-wlm and munge; .ci/run installs them): the example
batch script runs generate_fisher.py on the embedded digits case as 2 SLURM tasks, and its Fisher equals the
one of a single process; the comparison's job array; a preempted job requeued. Skipped, with the reason, where
SLURM cannot be started; under CI=true (CI installs SLURM) that is a failure, with the same reason.
"""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, assert_fisher_close, make_tiny_run_folder, run_in_process, run_script

DIGITS_DIT = os.path.join(ROOT, "assets", "digits_dit.pt")


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def _slurm_conf(host, spool):
    return "\n".join([
        "ClusterName=local", f"SlurmctldHost={host}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SlurmUser=root", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"StateSaveLocation={spool}/ctld", f"SlurmdSpoolDir={spool}/d", "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid", "ReturnToService=2", "MpiDefault=none",
        f"SlurmctldLogFile={spool}/slurmctld.log", f"SlurmdLogFile={spool}/slurmd.log",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def unavailable(reason):
    """SLURM cannot be set up: a skip with the reason, or under CI=true (where CI installed it) a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the SLURM tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Starts munged, slurmctld and slurmd; stops them afterwards."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "sinfo") if shutil.which(b) is None]
    if missing:
        unavailable(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        unavailable("starting slurmctld/slurmd needs root")
    if _run(["sinfo", "-h"]).returncode == 0 and "idle" in _run(["sinfo", "-h"]).stdout:
        yield None  # a running cluster: use it
        return
    host = socket.gethostname()
    spool = tmp_path_factory.mktemp("slurm-spool")
    os.makedirs(spool / "ctld")
    os.makedirs(spool / "d")
    started = []
    try:
        if not os.path.isfile("/etc/munge/munge.key"):
            os.makedirs("/etc/munge", exist_ok=True)
            with open("/etc/munge/munge.key", "wb") as f:
                f.write(os.urandom(1024))
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
            os.chmod("/etc/munge/munge.key", 0o400)
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if _run(["munge", "-n"]).returncode != 0:
            munged = subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "-F"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            started.append(munged)
            for _ in range(50):
                if _run(["munge", "-n"]).returncode == 0:
                    break
                time.sleep(0.2)
        os.makedirs("/etc/slurm", exist_ok=True)
        with open("/etc/slurm/slurm.conf", "w") as f:
            f.write(_slurm_conf(host, spool))
        for daemon in ("slurmctld", "slurmd"):
            started.append(subprocess.Popen([daemon, "-D"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        for _ in range(60):
            if "idle" in _run(["sinfo", "-h", "-o", "%T"]).stdout:
                break
            time.sleep(0.5)
        else:
            logs = [(spool / name).read_text().strip().splitlines()[-3:] for name in ("slurmctld.log", "slurmd.log")
                    if (spool / name).is_file()]
            unavailable(f"SLURM did not come up: {_run(['sinfo']).stdout.strip()} {logs}")
        yield host
    finally:
        for proc in reversed(started):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_example_batch_script_runs_two_tasks(slurm, tmp_path):
    data = tmp_path / "digits"
    run_in_process("prepare_digits.py", "--out", data, cwd=tmp_path, check=True)
    flags = ["--model", "DiT-T/2", "--data-path", str(data), "--ckpt", DIGITS_DIT, "--batch-size", "4",
             "--n-iters", "3", "--forget-class", "0", "--num-workers", "0"]
    out = tmp_path / "job.out"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(["sbatch", "--wait", "-N", "1", "-n", "2", "--ntasks-per-node=2", "-c", "1", "-o", str(out),
                           os.path.join(ROOT, "slurm", "single_node.sbatch"), os.path.join(ROOT, "generate_fisher.py"),
                           *flags, "--mask-path", str(tmp_path / "mask_slurm"), "--results-dir",
                           str(tmp_path / "results")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log
    assert "2 process(es)" in log, log
    run_in_process("generate_fisher.py", *flags, "--mask-path", tmp_path / "mask_one", "--results-dir",
                   tmp_path / "results", cwd=tmp_path, check=True)
    for name in ("forget_fisher.pt", "remain_fisher.pt"):
        two = torch.load(tmp_path / "mask_slurm" / "0" / name, weights_only=True)
        one = torch.load(tmp_path / "mask_one" / "0" / name, weights_only=True)
        assert_fisher_close(two, one)


def test_compare_job_array_gathers_one_table(slurm, tmp_path):
    """slurm/compare_array.sbatch as a 2-task array (the default recipe with its own gamma-5 mask, and ga) on the
    digits, then one table whose rows keep the dashed method name."""
    data = tmp_path / "digits"
    run_in_process("prepare_digits.py", "--out", data, cwd=tmp_path, check=True)
    out = tmp_path / "cmp"
    classifier = os.path.join(ROOT, "assets", "digits_classifier.pt")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DATA=str(data), OUT=str(out),
               METHODS="sfron-adversarial ga", CLASSES="0", SEEDS="0",
               MODEL_FLAGS=f"--model DiT-T/2 --ckpt {DIGITS_DIT}",
               FISHER_FLAGS="--n-iters 1 --batch-size 4 --num-workers 0",
               FORGET_FLAGS="--n-iters 2 --batch-size 4 --num-workers 0 --snapshot-every 0",
               SAMPLE_FLAGS="--samples-per-class 2 --num-sampling-steps 3 --sampler ddim",
               EVAL_FLAGS=f"--classifier digits --classifier-weights {classifier}")
    proc = subprocess.run(["sbatch", "--wait", "--array=0-1", "-n", "1", "--ntasks-per-node=1", "-c", "1", "-o",
                           str(tmp_path / "task-%a.out"),
                           os.path.join(ROOT, "slurm", "compare_array.sbatch")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("task-*.out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    reports = sorted(f for f in os.listdir(out / "reports") if f.endswith(".json"))
    assert reports == ["ga-0-seed0.json", "sfron-adversarial-0-seed0.json"], logs
    masks = sorted(f for f in os.listdir(out / "masks" / "seed0" / "0") if f.startswith("fisher_")
                   and f.endswith(".pt"))
    assert masks == ["fisher_5.0.pt"], masks  # the mask the recipe's own threshold asks for, made first
    run_script("bench/gather.py", "--reports", out / "reports", "--out", out / "table.md", cwd=tmp_path)
    summary = json.load(open(out / "table.json"))
    assert sorted(summary) == ["ga", "sfron-adversarial"], summary
    for method in ("ga", "sfron-adversarial"):
        report = json.load(open(out / "reports" / f"{method}-0-seed0.json"))[f"{method}-0-seed0"]
        assert summary[method]["cells"] == 1 and summary[method]["forget_acc"] == [report["forget_acc"], 0.0]
    assert "| sfron-adversarial | 1 |" in open(out / "table.md").read()


def test_early_signal_requeues_the_job_and_it_ends_as_an_uninterrupted_run(slurm, tmp_path):
    """The batch script gets its early signal (sbatch --signal=B:USR1 sends it to the batch shell, as scancel
    --batch does here): the task saves and exits 75, the job requeues itself, and the requeued job's result
    equals an uninterrupted run's."""
    make_tiny_run_folder(tmp_path)
    flags = ["--model", "DiT-T/2", "--data-path", tmp_path / "data", "--ckpt", tmp_path / "tiny.pt", "--batch-size", 4,
             "--n-iters", 150, "--ckpt-every", 1000, "--snapshot-every", 0, "--forget-class", 0, "--lr", "1e-3",
             "--num-workers", 0, "--log-every", 1, "--resume", "auto"]
    # a process of its own with one thread, as the job runs it: the reductions, and so the bits, depend on threads
    run_script("forget.py", *flags, "--results-dir", tmp_path / "reference", cwd=tmp_path)
    results, out = tmp_path / "results", tmp_path / "job.out"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    job = _run(["sbatch", "--parsable", "-n", "1", "--ntasks-per-node=1", "-c", "1", "-o", str(out),
                os.path.join(ROOT, "slurm", "single_node.sbatch"), os.path.join(ROOT, "forget.py"),
                *map(str, flags), "--results-dir", str(results)], cwd=tmp_path, env=env)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while "(step=0000005)" not in "".join(open(p).read() for p in glob.glob(str(results / "*" / "log.txt"))):
        assert time.time() < deadline, out.read_text() if out.exists() else "the job did not start"
        time.sleep(0.1)
    assert _run(["scancel", "--batch", "--signal=USR1", job_id]).returncode == 0
    requeued = None
    while True:
        state = _run(["scontrol", "show", "job", job_id]).stdout
        if "JobState=COMPLETED" in state or "JobState=FAILED" in state or time.time() > deadline:
            break
        if requeued is None and "Restarts=1" in state and "JobState=PENDING" in state:
            requeued = time.time()
        if requeued and time.time() > requeued + 6:
            # SLURM holds a requeued job for about two minutes (its BeginTime); the test waits only until slurmd
            # has let go of the first run (relaunched at once, slurmd refuses it: "already killed")
            _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
            requeued = 0
        time.sleep(0.2)
    log = out.read_text()
    assert "JobState=COMPLETED" in state and "Restarts=1" in state, state + log
    assert "stopping after step" in log and "requeueing job" in log, log
    (checkpoint,) = glob.glob(str(results / "*" / "checkpoints" / "0000150.pt"))
    (reference,) = glob.glob(str(tmp_path / "reference" / "*" / "checkpoints" / "0000150.pt"))
    a, b = torch.load(checkpoint, weights_only=True), torch.load(reference, weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]) and a["losses"] == b["losses"]
    saved = sorted(os.path.basename(p) for p in glob.glob(str(results / "*" / "checkpoints" / "*.pt")))
    assert len(saved) == 2 and saved[-1] == "0000150.pt"  # the one the signal wrote, and the last
