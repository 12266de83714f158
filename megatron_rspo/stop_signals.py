"""SIGTERM and SIGINT end a run the way a user wants: at the next iteration boundary, with a checkpoint.

Slurm sends SIGTERM before it preempts or times a job out (``#SBATCH --signal=TERM@120`` gives two minutes);
torchrun forwards it to every rank; Ctrl-C sends SIGINT to every rank of the terminal's process group. The
first signal only sets a flag: the loop finishes its iteration, the ranks agree that one of them was
signalled (one small collective per iteration), save, and stop with one line and the shell's usual exit
code (128 + the signal number). A second Ctrl-C interrupts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Optional

from megatron_rspo import distributed
from megatron_rspo.errors import RunStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(RunStopped):
    """Raised after the checkpoint: the run ended because it was asked to."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Take over SIGTERM and SIGINT (only the main thread can; elsewhere this is a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        if distributed.rank() == 0:
            print(f"received {signal.Signals(signum).name}: stopping after this iteration (with a checkpoint where "
                  "--save is set; Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def agreed(self) -> Optional[int]:
        """The signal any rank received (collective: every rank calls it at the same point), else None."""
        signum = distributed.agree_int(self.received or 0, distributed.ReduceOp.MAX)
        return signum or None

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
