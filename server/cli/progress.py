"""What ``fedtan run`` prints of Flower's log: one line per round, and what went wrong.

The ServerApp logs a line per round (``server/results.py``); the rest of Flower's stream
(start-up, sampling, Ray's notices) stays in the run's log file unless ``--verbose``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ROUND = re.compile(
    r"\[(?P<method>[\w-]+) round (?P<round>\d+)/(?P<rounds>\d+)\] train-loss (?P<loss>\S+)"
    r" \| test-accuracy (?P<accuracy>\S+) \| (?P<seconds>[\d.]+) s"
)
_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Error:|Exit Code")
# What an error says: a logged ERROR, or the last line of a traceback ("pkg.SomeError: ...").
_ERROR = re.compile(
    r"\bERROR\b\s*:?\s*(?P<text>.+)|^(?P<raised>[\w.]*(Error|Failure|Exception): .+)"
)
# Notices that say nothing is wrong with this run.
_NOISE = (
    "Federated evaluation will be skipped",  # FedAvg's, when the strategy evaluates on its own
    "default simulated SuperNodes changed",  # the federation size is always set
    "Manually terminating ClientAppActor",  # Ray's actors at the end of every simulation
    "FutureWarning",
    "warnings.warn(",
)


@dataclass
class Progress:
    """Turns the run's log lines into the lines a user reads; keeps the last round's numbers."""

    verbose: bool = False
    rounds_done: int = 0
    num_rounds: int = 0
    accuracy: float | None = None
    round_seconds: list[float] = field(default_factory=list)
    last_exception: str | None = None  # the last traceback's last line ("pkg.Error: ...")
    last_error: str | None = None  # the last logged ERROR ("Exit Code: 700" after a traceback)

    def show(self, raw: str) -> str | None:
        line = _ANSI.sub("", raw).rstrip()
        if match := _ROUND.search(line):
            return self._round_line(match)
        if error := _ERROR.search(line):
            if error["raised"]:
                self.last_exception = error["raised"].strip()
            else:
                self.last_error = error["text"].strip()
            return line
        if self.verbose:
            return line
        if line and _PROBLEM.search(line) and not any(noise in line for noise in _NOISE):
            return line
        return None

    @property
    def failure(self) -> str | None:
        """What the log says went wrong: the exception if one was raised, else the last ERROR."""
        return self.last_exception or self.last_error

    def _round_line(self, match: re.Match[str]) -> str:
        self.rounds_done, self.num_rounds = int(match["round"]), int(match["rounds"])
        self.round_seconds.append(float(match["seconds"]))
        accuracy = match["accuracy"]
        if accuracy != "-":
            self.accuracy = float(accuracy)
        # From the rounds' own times, leaving out round 1 once there are others: it carries the
        # start-up (Ray's actors, data, first connections).
        steady = self.round_seconds[1:] or self.round_seconds
        per_round = sum(steady) / len(steady)
        eta = per_round * (self.num_rounds - self.rounds_done)
        return (
            f"round {self.rounds_done}/{self.num_rounds}  loss {match['loss']}  "
            f"accuracy {accuracy}  {float(match['seconds']):.1f} s  eta {_duration(eta)}"
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"
