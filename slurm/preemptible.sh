# Sourced by the batch scripts: `preemptible <command>` runs the job step in the background so that the batch shell
# can catch the early signal (sbatch --signal=B:USR1@...) and SIGTERM. It passes either to every task of the job's
# steps (scancel --signal), waits for them to save their state, and requeues the job when the tasks exit with 75
# (stopped on request, state saved). Any other status is the job's.
preemptible() {
    "$@" &
    local step=$! status
    trap 'echo "batch script: passing the signal to the tasks"; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1 TERM
    while true; do
        wait "$step"; status=$?
        kill -0 "$step" 2>/dev/null || break  # wait returned for a signal: the step is still running
    done
    trap - USR1 TERM
    if [ "$status" -eq 75 ]; then
        echo "batch script: the tasks saved their state; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
}
