# Shared by the job scripts (sourced, not run): resume detection and a signal-forwarding job step.
#
# Why the step runs in the background: `#SBATCH --signal=B:USR1@N` signals only the batch shell, and
# bash runs a trap only between commands, never while a foreground command runs. So the shell starts
# the step with `&`, sits in `wait` (which a trapped signal interrupts at once), passes the signal on
# to the step (srun and mpirun forward it to every rank), and waits again until the ranks have
# finished their round, checkpointed and exited.

# Print a line with a timestamp, prefixed so it stands out among the ranks' output.
osfed_log() {
  printf '[job %s] %s %s\n' "${SLURM_JOB_ID:-local}" "$(date '+%F %T')" "$*"
}

# osfed_finished OUT: true when OUT holds a finished run (summary.json).
osfed_finished() {
  [[ -f "$1/summary.json" ]]
}

# osfed_resume_args OUT: set the array RESUME to (--resume OUT) when OUT holds a complete checkpoint.
# A requeued job (SLURM_RESTART_COUNT > 0) would resume by itself; this also covers a job that was
# submitted again by hand after a crash or a time limit without requeue.
osfed_resume_args() {
  RESUME=()
  if "$PYTHON" - "$1" <<'EOF'
import sys
from osfed_hpc.checkpoint import latest_checkpoint
sys.exit(0 if latest_checkpoint(sys.argv[1]) else 1)
EOF
  then
    RESUME=(--resume "$1")
    osfed_log "resuming from the last checkpoint in $1 (restart count ${SLURM_RESTART_COUNT:-0})"
  fi
}

# osfed_step CMD ARGS...: run CMD in the background, forward USR1/TERM to it, return its exit status.
osfed_step() {
  "$@" &
  OSFED_STEP_PID=$!
  trap 'osfed_forward USR1' USR1
  trap 'osfed_forward TERM' TERM
  local rc status=0
  while :; do
    OSFED_SIGNALLED=0
    rc=0
    wait "$OSFED_STEP_PID" || rc=$?
    if [[ $OSFED_SIGNALLED == 0 ]]; then status=$rc; break; fi
    # wait was cut short by a forwarded signal: wait again for the step's own exit status
    # (127: the step had already been waited for, its status is the one we kept)
    if [[ $rc == 127 ]]; then break; fi
    status=$rc
  done
  trap - USR1 TERM
  return "$status"
}

osfed_forward() {
  OSFED_SIGNALLED=1
  osfed_log "got SIG$1: passing it to the job step (pid $OSFED_STEP_PID); the ranks checkpoint at the next round boundary"
  kill -s "$1" "$OSFED_STEP_PID" 2>/dev/null || true
}
