"""How a job ends when it does not finish: calm, one line, and a status the launchers understand.

- An error no retry can fix (a config error, bad data, a missing file) prints one line
  (`MTRAIN_DEBUG=1` adds the traceback) and exits with `EXIT_NO_RETRY`. Under a launcher whose
  restart loop cannot see a rank's exit status (torchrun reports 1 for any failed worker), the
  rank also writes its line to `$MTRAIN_NO_RETRY_FILE`; the loops in launchers/ stop when it exists.
- SIGINT or SIGTERM ends training with one summary line (rank 0): the step reached, the latest
  checkpoint and the command that continues the run; it also goes to `$MTRAIN_SUMMARY_FILE` so a
  launcher can print it last, after the launcher's own output.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType

EXIT_NO_RETRY = 2
"""Exit status of an error no restart can fix; launchers/ never retry it."""
EXIT_INTERRUPTED = 130
"""Exit status after SIGINT/SIGTERM (128 + SIGINT, as shells report it)."""


class NoRetryError(Exception):
    """An error no restart can fix (a full or read-only disk, ...): `mtrain` reports it in one line and
    exits with EXIT_NO_RETRY."""


def debug_enabled() -> bool:
    return os.environ.get("MTRAIN_DEBUG", "") not in ("", "0")


def _write(env_name: str, line: str) -> None:
    path = os.environ.get(env_name)
    if path:
        try:
            Path(path).write_text(line + "\n")
        except OSError:  # the report on stderr is what matters; the file only helps a launcher
            pass


def report_final_error(kind: str, exc: BaseException) -> int:
    """Print `mtrain: KIND: message` (the traceback only under MTRAIN_DEBUG=1); the no-retry status."""
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank not in (None, "0") else ""
    line = f"mtrain: {kind}{where}: {exc}"
    print(line, file=sys.stderr, flush=True)
    _write("MTRAIN_NO_RETRY_FILE", line)
    return EXIT_NO_RETRY


# What gloo and NCCL say when a peer process died (killed, its node lost) in the middle of a collective.
LOST_PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
)


def is_lost_peer(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in LOST_PEER_MARKERS)


def report_lost_peer(exc: BaseException) -> int:
    """One line for a rank whose peer died; the launcher's restart (if any) resumes from `latest`. Retryable."""
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    rank = os.environ.get("RANK", "0")
    print(
        f"mtrain: rank {rank} lost a peer rank mid-step ({first[:200]}); a launcher with restarts left "
        "restarts the job from the latest checkpoint (MTRAIN_DEBUG=1 for the traceback)",
        file=sys.stderr,
        flush=True,
    )
    return 1


def raise_keyboard_interrupt_on_sigterm() -> None:
    """SIGTERM (a launcher or scheduler stopping the job) ends training like Ctrl-C does."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)


def continue_command() -> str:
    """The command that continues this run: the launcher's (`MTRAIN_COMMAND`), else this process's."""
    launched = os.environ.get("MTRAIN_COMMAND")
    if launched:
        return launched
    return shlex.join([Path(sys.executable).name, "-m", "mtrain", *sys.argv[1:]])


def last_logged_step(run_dir: Path) -> int | None:
    import json  # noqa: PLC0415

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    try:
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (ValueError, KeyError):  # a line cut by the interrupt itself
        return int(json.loads(lines[-2])["step"]) if len(lines) > 1 else None


def interrupt_summary(run_dir: Path) -> str:
    """One line: where the run stands and how to continue it."""
    step = last_logged_step(run_dir)
    latest_file = run_dir / "checkpoints" / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    reached = f"step {step}" if step is not None else "no step"
    saved = f"latest checkpoint {run_dir / 'checkpoints' / latest}" if latest else "no checkpoint saved yet"
    return f"mtrain: interrupted at {reached}; {saved}; continue with: {continue_command()}"


def report_interrupt(run_dir: Path) -> int:
    """On rank 0 (or without a launcher): print the summary line; every rank: the interrupted status."""
    if os.environ.get("RANK", "0") == "0":
        line = interrupt_summary(run_dir)
        print(line, file=sys.stderr, flush=True)
        _write("MTRAIN_SUMMARY_FILE", line)
    return EXIT_INTERRUPTED
