"""The ``pyrovae`` command: train, sample, evaluate, report, compare, bdmc.

``main`` turns errors into one line and an exit code; :mod:`.parser` defines the options and
:mod:`.commands` runs each command through the library.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pyrovae.inference.cli.parser import build_parser
from pyrovae.inference.errors import Interrupted, PyrovaeError, check_int


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyrovae`` command; returns the exit code.

    Every problem with the user's input, files or environment is one line on stderr and
    exit code 2 (130 for an interruption); ``--debug`` shows the traceback instead. A reader
    that closes the output early (``| head``) ends the printing quietly, with exit code 0,
    whatever the command.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            torch.set_num_threads(check_int(args.threads, "--threads", error=PyrovaeError))
        args.command(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except BrokenPipeError:
        # The reader went away (`| head`) after the work was done and written: as for any
        # Unix filter, that is not a failure. Stop writing to it, without a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Interrupted as e:
        _say(f"pyrovae: {e}")
        return 130
    except KeyboardInterrupt:
        _say("pyrovae: interrupted")
        return 130
    except (PyrovaeError, OSError) as e:
        if args.debug:
            raise
        line = f"pyrovae: error: {_one_line(e)}"
        _say(line)
        _tell_the_launcher(line)
        return 2
    return 0


def _say(line: str) -> None:
    """Writes one line to stderr in one write, so that the lines of several ranks under
    torchrun (which share the stream) never interleave within a line, as print's separate
    write of the newline lets them."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _tell_the_launcher(line: str) -> None:
    """Under torchrun, writes the error line where torch.distributed.elastic reads a failed
    rank's error (``TORCHELASTIC_ERROR_FILE``), in the plain-message form it accepts, so that
    the "Root Cause" of torchrun's own failure summary names it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    except OSError:
        pass  # the line is on stderr already


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


__all__ = ["main"]
