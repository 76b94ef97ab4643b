"""
Fault injection: forget.py, generate_fisher.py and sample_ddp.py killed with SIGKILL at moments a fixed seed
chooses (and in the middle of a checkpoint write), then run again with the same command: no file is ever left
corrupt or half-written, and every run ends bit-identical to an uninterrupted one. Also SIGUSR1 to one process of
a 2-process torchrun run (whose uninterrupted run follows the one-process run), a full disk while saving, and a
requeued SLURM job (tests/test_slurm.py's cluster).
The processes are forked from this one (the scripts' modules are already imported), so a kill costs no start-up.
"""
import glob
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import forget
import generate_fisher
import sample_ddp
from helpers import assert_fisher_close, make_tiny_run_folder, run_in_process, run_script, script_command

KILLS = {"forget": 18, "forget_mid_write": 2, "fisher": 10, "sample_ddp": 5}  # at least 20, 10 and some


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_run_folder(tmp_path_factory.mktemp("faults"))


def fresh_tqdm_lock():
    """A forked child's own tqdm write lock: the parent's holds a process-shared semaphore once any bar was drawn in
    the test process, and a sibling SIGKILLed while drawing one would leave it held for every later child."""
    import multiprocessing

    import tqdm
    from tqdm.std import TqdmDefaultWriteLock
    TqdmDefaultWriteLock.mp_lock = multiprocessing.RLock()
    tqdm.tqdm.set_lock(TqdmDefaultWriteLock())


def forked(script, argv, cwd, setup=None):
    """Runs script's command line in a forked child (one thread, output to <cwd>/child.log); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        fresh_tqdm_lock()
        torch.set_num_threads(1)
        os.chdir(cwd)
        sys.stdout = sys.stderr = open(os.path.join(cwd, "child.log"), "a", buffering=1)
        if setup is not None:
            setup()
        from cli import run_main
        run_main(script.main, script.parse_args([str(a) for a in argv]))
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    finally:
        os._exit(status)


def wait(pid):
    """The exit status of a forked child (negative: the signal that killed it)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill_at_random(script, argv, cwd, kills, draw_delay, out):
    """Starts the command and SIGKILLs it after draw_delay() seconds, checking the files under `out` each time,
    until `kills` of them were killed while running (a run that finished first does not count); returns the
    count."""
    killed = 0
    for _ in range(5 * kills):
        pid = forked(script, argv, cwd)
        time.sleep(draw_delay())
        done, _ = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
            killed += wait(pid) == -signal.SIGKILL
        assert_no_corrupt_file(out)
        if killed == kills:
            break
    return killed


def die_mid_write():
    """In a child: the first torch file it writes gets half its bytes, then the process is SIGKILLed."""
    def save(obj, f, *args, **kwargs):
        f.write(b"\x00" * 4096)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save


def assert_no_corrupt_file(folder):
    """Every file but atomic_write's temporaries (.<name>.<random>.tmp, removed by the next run) reads whole."""
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        name = os.path.basename(path)
        if os.path.isdir(path) or name.endswith(".tmp"):
            continue
        if name.endswith(".pt"):
            torch.load(path, weights_only=True)
        elif name.endswith(".json"):
            json.load(open(path))
        elif name.endswith(".png"):
            Image.open(path).load()
        elif name.endswith(".npz"):
            dict(np.load(path))


def temporaries(folder):
    return glob.glob(os.path.join(folder, "**", ".*.tmp"), recursive=True)


def reference_and_kills(script, argv_for, tmp_path, seed, kills, share):
    """Runs argv_for(tmp_path / "reference") uninterrupted, timing it; then argv_for(tmp_path / "killed") until it
    was SIGKILLed `kills` times, each after a delay drawn (seed) from [0, share x that time]. Returns (reference
    folder, killed folder, kill count)."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    start = time.time()
    assert wait(forked(script, argv_for(reference), tmp_path)) == 0, open(tmp_path / "child.log").read()
    rng, seconds = random.Random(seed), time.time() - start
    count = kill_at_random(script, argv_for(killed), tmp_path, kills, lambda: rng.uniform(0, share * seconds), killed)
    return reference, killed, count


def forget_args(workdir, results, *extra):
    return ["--model", "DiT-T/2", "--data-path", workdir / "data", "--ckpt", workdir / "tiny.pt", "--batch-size", 4,
            "--n-iters", 40, "--ckpt-every", 3, "--snapshot-every", 0, "--forget-class", 0, "--lr", "1e-3",
            "--num-workers", 0, "--results-dir", results, "--resume", "auto", *extra]


def final_checkpoint(results, step):
    (path,) = glob.glob(os.path.join(results, "*", "checkpoints", f"{step:07d}.pt"))
    return torch.load(path, weights_only=True)


def assert_same_run(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["losses"] == b["losses"]


def test_forget_killed_20_times_ends_bit_identical(workdir, tmp_path):
    reference, results, killed = reference_and_kills(forget, lambda out: forget_args(workdir, out), tmp_path, 0,
                                                     KILLS["forget"], 1 / 6)
    for _ in range(KILLS["forget_mid_write"]):  # in the middle of a checkpoint write
        status = wait(forked(forget, forget_args(workdir, results), tmp_path, setup=die_mid_write))
        killed += status == -signal.SIGKILL
        assert_no_corrupt_file(results)
    assert temporaries(results), "the mid-write kills leave their temporary files until the next run"
    assert killed >= 20
    assert wait(forked(forget, forget_args(workdir, results), tmp_path)) == 0
    assert_same_run(final_checkpoint(results, 40), final_checkpoint(reference, 40))
    assert temporaries(results) == [] and len(glob.glob(str(results / "*" / "checkpoints" / "0000040.pt"))) == 1


def fisher_args(workdir, mask):
    return ["--model", "DiT-T/2", "--data-path", workdir / "data", "--ckpt", workdir / "tiny.pt", "--batch-size", 4,
            "--n-iters", 20, "--ckpt-every", 2, "--forget-class", 1, "--mask-path", mask, "--num-workers", 0,
            "--results-dir", workdir / "fisher_results", "--gradient-saliency"]


def test_fisher_killed_10_times_ends_bit_identical(workdir, tmp_path):
    reference, mask, killed = reference_and_kills(generate_fisher, lambda out: fisher_args(workdir, out), tmp_path,
                                                  1, KILLS["fisher"], 1 / 3)
    assert killed == KILLS["fisher"]
    (mask / "1").mkdir(parents=True, exist_ok=True)
    (mask / "1" / ".forget_fisher.pt.planted.tmp").write_bytes(b"half")  # as a kill during the output write leaves
    assert wait(forked(generate_fisher, fisher_args(workdir, mask), tmp_path)) == 0
    for name in ("forget_fisher.pt", "remain_fisher.pt", "forget_gradient.pt"):
        a, b = (torch.load(m / "1" / name, weights_only=True) for m in (reference, mask))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not os.path.exists(mask / "1" / "fisher_progress") and temporaries(mask) == []
    other = run_in_process("generate_fisher.py", *fisher_args(workdir, mask)[:-1], "--seed", 3, cwd=tmp_path)
    assert other.returncode == 0  # a finished run leaves no progress to mix with


def test_fisher_progress_of_other_settings_is_refused(workdir, tmp_path):
    mask = tmp_path / "mask"
    status = wait(forked(generate_fisher, fisher_args(workdir, mask), tmp_path, setup=stop_after_first_save))
    assert status == 75 and os.path.isdir(mask / "1" / "fisher_progress")
    proc = run_in_process("generate_fisher.py", *fisher_args(workdir, mask), "--seed", 5, cwd=tmp_path)
    assert proc.returncode == 1 and "holds the progress of another run" in proc.stderr
    assert "--seed 5 differs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def stop_after_first_save():
    """In a child: SIGUSR1 to itself once the first progress file is written (a preemption notice)."""
    from sfron import progress
    save = progress.ProgressFolder.save

    def save_then_signal(self, *args):
        save(self, *args)
        os.kill(os.getpid(), signal.SIGUSR1)
    progress.ProgressFolder.save = save_then_signal


def sample_args(workdir, out):
    return ["--model", "DiT-T/2", "--ckpt", workdir / "tiny.pt", "--num-classes", 3, "--image-size", 8,
            "--samples-per-class", 6, "--per-proc-batch-size", 2, "--num-sampling-steps", 12,
            "--sample-dir", out, "--global-seed", 3]


def test_sample_ddp_removes_its_npz_temporary_only(workdir, tmp_path):
    """A writer killed inside save_npz leaves .<name>.npz.<random>.tmp beside the folder: the next run removes it,
    and leaves another file's temporary in the same folder alone."""
    out = tmp_path / "samples"
    out.mkdir()
    stale = out / ".DiT-T-2-tiny-size-8-vae-none-cfg-1.5-seed-3.npz.k1ll3d.tmp"
    foreign = out / ".other-run.npz.w0rk1n.tmp"
    stale.write_bytes(b"half")
    foreign.write_bytes(b"busy")
    proc = run_in_process("sample_ddp.py", *sample_args(workdir, out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and foreign.read_bytes() == b"busy"
    assert len(glob.glob(str(out / "*.npz"))) == 1


def test_sample_ddp_killed_ends_identical(workdir, tmp_path):
    reference, out, killed = reference_and_kills(sample_ddp, lambda out: sample_args(workdir, out), tmp_path, 2,
                                                 KILLS["sample_ddp"], 1 / 3)
    assert killed == KILLS["sample_ddp"]
    assert wait(forked(sample_ddp, sample_args(workdir, out), tmp_path)) == 0
    (a,), (b,) = glob.glob(str(reference / "*.npz")), glob.glob(str(out / "*.npz"))
    assert np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"]) and temporaries(out) == []
    changed = run_in_process("sample_ddp.py", *sample_args(workdir, out), "--num-sampling-steps", 5, cwd=tmp_path)
    assert changed.returncode == 1 and "drawn with other settings (sampler differ)" in changed.stderr


def test_full_disk_while_saving_keeps_the_last_checkpoint(workdir, tmp_path):
    """A file-size limit (EFBIG, as a full disk's ENOSPC) hits the second checkpoint: one error line, the first
    checkpoint intact, no temporary file."""
    def limit_after_first_checkpoint():
        from sfron import files
        write = files.atomic_write

        def limited(path, *args, **kwargs):
            write(path, *args, **kwargs)
            if path.endswith(".pt"):
                resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        files.atomic_write = limited
    results = tmp_path / "results"
    argv = forget_args(workdir, results)
    argv[argv.index("--n-iters") + 1] = 6
    status = wait(forked(forget, argv, tmp_path, setup=limit_after_first_checkpoint))
    errors = [line for line in open(tmp_path / "child.log") if line.startswith("error:")]
    assert status == 1 and len(errors) == 1 and "cannot write" in errors[0] and "0000006.pt" in errors[0], errors
    (checkpoint,) = glob.glob(str(results / "*" / "checkpoints" / "*.pt"))
    assert checkpoint.endswith("0000003.pt") and torch.load(checkpoint, weights_only=True)["train_steps"] == 3
    assert temporaries(results) == []


def children(pid):
    """The pids whose parent is pid (from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(os.path.basename(os.path.dirname(stat))))
    return sorted(found)


def sigusr1_to_one_of_two(script, args, cwd, ready, worker):
    """Runs script under torchrun with 2 processes, sends SIGUSR1 to one of them (`worker`: 0 or 1 in pid order)
    once a file matching the glob `ready` exists, and returns the run's output."""
    cmd, env = script_command(script, *args, nproc=2)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(ready)):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-2000:]
        time.sleep(0.05)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[worker], signal.SIGUSR1)  # one process only: the other learns of it at the step boundary
    return proc.communicate(timeout=120)[0]


def test_sigusr1_to_one_torchrun_process_stops_both_after_the_same_step(workdir, tmp_path):
    def argv(results):
        args = forget_args(workdir, results, "--log-every", 1)
        args[args.index("--n-iters") + 1] = 30
        return args
    reference = run_script("forget.py", *argv(tmp_path / "reference"), cwd=tmp_path, nproc=2)
    assert "on 2 process(es)" in reference.stdout
    # DDP on gloo (each process takes half of every batch) follows the one-process run
    one = forget_args(workdir, tmp_path / "one")
    one[one.index("--n-iters") + 1] = 3
    run_in_process("forget.py", *one, cwd=tmp_path, check=True)
    a, b = final_checkpoint(tmp_path / "one", 3), final_checkpoint(tmp_path / "reference", 3)
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-4, atol=1e-6)
    # the updates agree as a whole to 1%: Adam divides each gradient by its own size, so an entry whose gradient is
    # rounding noise (the attention key bias) moves by about the rate either way, in either direction
    start = torch.load(workdir / "tiny.pt", weights_only=True)
    moved = sum(float((a["model"][k] - start[k]).abs().sum()) for k in start)
    apart = sum(float((b["model"][k] - a["model"][k]).abs().sum()) for k in start)
    assert moved > 1.0 and apart / moved < 0.01, (apart, moved)
    output = sigusr1_to_one_of_two("forget.py", argv(tmp_path / "stopped"), tmp_path,
                                   tmp_path / "stopped" / "*" / "checkpoints" / "0000003.pt", 1)
    stops = re.findall(r"\[rank (\d)\] ([^:\n]+): stopping after step (\d+)", output)
    assert sorted(rank for rank, _, _ in stops) == ["0", "1"], output[-3000:]
    assert sorted(name for _, name, _ in stops) == ["SIGUSR1", "a signal to another process"], stops
    assert len({step for _, _, step in stops}) == 1 and int(stops[0][2]) < 30, stops
    run_script("forget.py", *argv(tmp_path / "stopped"), cwd=tmp_path, nproc=2)
    assert_same_run(final_checkpoint(tmp_path / "stopped", 30), final_checkpoint(tmp_path / "reference", 30))


def test_fisher_stopped_under_torchrun_continues_bit_identical(workdir, tmp_path):
    """Two processes: SIGUSR1 to one of them, then the same command; the Fisher equals the uninterrupted 2-process
    one bit for bit (and a one-process run to rounding); the progress refuses another number of processes."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    run = run_script("generate_fisher.py", *fisher_args(workdir, reference), cwd=tmp_path, nproc=2)
    assert "2 process(es)" in run.stdout
    output = sigusr1_to_one_of_two("generate_fisher.py", fisher_args(workdir, stopped), tmp_path,
                                   stopped / "1" / "fisher_progress" / "manifest.json", 0)
    stops = re.findall(r"\[rank (\d)\] [^:\n]+: stopping after batch (\d+)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({batch for _, batch in stops}) == 1, output[-3000:]
    one = run_in_process("generate_fisher.py", *fisher_args(workdir, stopped), cwd=tmp_path)
    assert one.returncode == 1 and "the running sums of 2 processes" in one.stderr
    run = run_script("generate_fisher.py", *fisher_args(workdir, stopped), cwd=tmp_path, nproc=2)
    assert "continuing from batch" in run.stdout
    for name in ("forget_fisher.pt", "remain_fisher.pt", "forget_gradient.pt"):
        a, b = (torch.load(m / "1" / name, weights_only=True) for m in (reference, stopped))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    run_in_process("generate_fisher.py", *fisher_args(workdir, tmp_path / "one"), cwd=tmp_path, check=True)
    for name in ("forget_fisher.pt", "remain_fisher.pt"):  # the number of processes changes only the rounding
        assert_fisher_close(torch.load(reference / "1" / name, weights_only=True),
                            torch.load(tmp_path / "one" / "1" / name, weights_only=True))
