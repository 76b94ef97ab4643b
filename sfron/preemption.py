"""
Stopping a long run cleanly when the cluster asks. SLURM sends SIGTERM before it kills or preempts a job, and the
signal of `sbatch --signal=B:USR1@120` some time before the time limit. While a StopSignals context is active
either signal only sets a flag; the script finishes the step in progress, every process agrees at the step
boundary that one of them was signalled (so all stop after the same step), the run's state is written, and the
script exits with EXIT_PREEMPTED. Running the same command again continues the run.
"""
import signal
import sys
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: stopped on request, state saved, the same command continues


class Preempted(Exception):
    """Raised after a signalled run has saved its state; the scripts exit with EXIT_PREEMPTED."""

    def __init__(self, signal_name, where):
        super().__init__(f"stopped by {signal_name} {where}; run the same command again to continue")


class StopSignals:
    """Catches SIGTERM and SIGUSR1 for the body of a `with` block (the handlers before it come back after)."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._announced = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self, dist, where):
        """True on every process when any of them was signalled: a collective call, made by all at each step.
        Each process then says at once, on stderr, that it stops `where` (before any of them exits)."""
        stopping = self.received is not None
        if dist.enabled:
            flag = torch.tensor(float(stopping), device=dist.device)
            stopping = bool(dist.all_reduce_sum_(flag) > 0)
        if stopping and not self._announced:
            self._announced = True
            sys.stderr.write(f"[rank {dist.rank}] {self.name()}: stopping {where}\n")  # one write: lines of
            sys.stderr.flush()                                                           # processes do not mix
        return stopping

    def name(self):
        """The signal this process received (or the one a peer received)."""
        return self.received or "a signal to another process"


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of data-loading processes: the signals are for the main processes, which stop cleanly (a
    DataLoader worker killed by SIGTERM would make its main process fail instead). Such workers outlive the
    usual SIGTERM of multiprocessing's exit handler: end_worker_processes() ends them instead."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_worker_processes():
    """SIGKILLs the multiprocessing children still alive (data-loading workers left by an error): called as a
    script ends, before multiprocessing's exit handler would wait for them forever."""
    import multiprocessing
    for child in multiprocessing.active_children():
        child.kill()
        child.join()
