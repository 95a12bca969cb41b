"""Calibrated compression: the smallest file whose self-check meets a fidelity target (`--target-top1`,
`--target-kld`).

The document is prefilled and scored once; each candidate (kept ratio, key bits, value bits) is then pruned from
the same scores, written, loaded back and self-checked (kvzip_cli.evaluation.self_check), so the figures are those
of the very bytes a user would load. The search assumes fidelity grows with the kept ratio and with the bits: for each
bit width (4 bits first, then 3, 3/2, 2, and 8 last) it bisects the ratios for the least one that meets the
target, within the bounds the widths already searched imply (more bits never need a larger ratio, fewer bits never
a smaller one), and skips candidates whose expected size cannot beat the best file found. A width that fails even
with the whole cache rules out every width below it. The search stops when no width is left or its time budget (in
prefills of the document) is spent.
"""

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..attention import kvc_attention_in
from ..errors import KvcError
from ..evaluation.self_check import SelfCheck, SelfCheckResult
from ..load.loader import load
from ..progress import TaskFactory, silent_task
from ..prune.budget import protected_positions, visible_positions
from ..prune.scoring import Pruning, Scored
from .prefilled import Prefilled
from .result import CompressResult
from .settings import DEFAULT_BUDGET, QuantOptions, Target, check_budget
from .write import write_kvc

BIT_LADDER = ((8, 8), (4, 4), (3, 3), (3, 2), (2, 2))  # (key bits, value bits), most precise first
# 4 bits first, the usual winner on the corpus; 8 bits last: it only wins where 4 bits fail on the whole cache, and
# its trials at the smaller ratios it would need spent the budget before 3 and 2 bits were tried.
SEARCH_ORDER = ((4, 4), (3, 3), (3, 2), (2, 2), (8, 8))
RATIOS = (0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MIN_BUDGET_SECONDS = 30.0  # short documents prefill in a second or less; a search always gets this much
MAX_TRIALS = 30
LOSSLESS = (16, 16)



@dataclass(frozen=True)
class Candidate:
    ratio: float
    key_bits: int
    bits: int  # values' bits (16: lossless floats, keys too)


@dataclass(frozen=True)
class Trial:
    candidate: Candidate
    file_bytes: int
    self_check: SelfCheckResult
    met: bool
    seconds: float

    def as_json(self) -> dict:
        return {**asdict(self.candidate), "file_bytes": self.file_bytes, "met": self.met,
                "seconds": round(self.seconds, 3), **self.self_check.as_json()}


@dataclass(frozen=True)
class Calibration:
    target: Target
    chosen: Trial
    trials: list[Trial]
    search_seconds: float  # self-check reference, every trial, and the search's own work
    prefill_seconds: float
    exhausted: bool  # the budget ran out before the search finished

    def header(self) -> dict:
        """What the file records (SPEC.md, header key `calibration`)."""
        c = self.chosen
        return {
            "target": self.target.as_json(),
            "met": c.met,
            "chosen": asdict(c.candidate),
            "self_check": c.self_check.as_json(),
            "trials": len(self.trials),
            "search_seconds": self.search_seconds,
            "search_prefills": self.search_seconds / self.prefill_seconds if self.prefill_seconds else None,
            "budget_exhausted": self.exhausted,
        }


def calibrate(pre: Prefilled, scored: Scored, target: Target, output: Path, *, budget: float = DEFAULT_BUDGET,
              allocation: str | None = None, quant: QuantOptions | None = None,
              task: TaskFactory = silent_task) -> tuple[Calibration, CompressResult]:
    """Search, then write the chosen candidate to `output` with the calibration in its header. `quant` gives the
    quantization options the search leaves alone (value group, RoPE removal)."""
    quant = quant or QuantOptions()
    target.check()
    check_budget(budget)
    started = time.perf_counter()
    check = SelfCheck(pre)
    if not check.probes:
        raise KvcError("the document is too short for a self-check: it needs lines of more than "
                       "8 words with text after them")
    # The budget bounds the trials; the probes' reference answers (computed once, above) count in the reported cost.
    allowed = max(budget * pre.prefill_seconds, MIN_BUDGET_SECONDS)
    trials_started = time.perf_counter()
    deadline = trials_started + allowed

    def prune(ratio: float) -> Pruning | None:
        return scored.keep(ratio, allocation) if ratio < 1 else None

    advance = task("search (s)", math.ceil(allowed))  # the bar counts the budget's seconds, trial by trial
    spent = 0
    with tempfile.TemporaryDirectory(prefix="kvc-calibrate-", dir=output.parent) as tmp:
        def trial(candidate: Candidate) -> Trial:
            nonlocal spent
            t = _trial(pre, prune, quant, check, target, candidate, Path(tmp) / "candidate.kvc")
            seconds = round(time.perf_counter() - trials_started)
            advance(seconds - spent)
            spent = seconds
            return t

        def out_of_time(next_trial_seconds: float) -> bool:
            return time.perf_counter() + next_trial_seconds > deadline

        trials, exhausted = search(trial, out_of_time, ratios=allowed_ratios(pre))
        # Nothing met the target (or the budget ran out first): the most precise quantized file, else the lossless one.
        for fallback in (Candidate(1.0, *BIT_LADDER[0]), Candidate(1.0, *LOSSLESS)):
            if any(t.met for t in trials) or any(t.candidate == fallback for t in trials):
                continue
            trials = [*trials, trial(fallback)]
        passing = [t for t in trials if t.met]
        chosen = min(passing, key=lambda t: t.file_bytes) if passing else trials[-1]
    advance(max(math.ceil(allowed) - spent, 0))
    calibration = Calibration(target, chosen, trials, time.perf_counter() - started, pre.prefill_seconds, exhausted)
    made = _write(pre, prune, quant, chosen.candidate, output, calibration.header())
    return calibration, made



def search(trial: Callable[[Candidate], Trial], out_of_time: Callable[[float], bool],
           ratios: tuple[float, ...] = RATIOS) -> tuple[list[Trial], bool]:
    """Every trial run, in order, and whether the budget ran out first. `ratios` ascending; `out_of_time(s)` says
    whether a trial expected to take s seconds would overrun the budget."""
    trials: list[Trial] = []
    least: dict[tuple[int, int], int] = {}  # per bit width, the index of the least ratio found to meet the target
    hopeless: set[tuple[int, int]] = set()  # widths that failed even at the largest ratio
    rank = {width: i for i, width in enumerate(BIT_LADDER)}  # 0: most precise
    for width in SEARCH_ORDER:
        if any(rank[w] < rank[width] for w in hopeless):
            continue  # more bits failed at every ratio: fewer bits will too
        # More precise widths need no larger ratio than this one, less precise ones no smaller.
        lo = max((i for w, i in least.items() if rank[w] < rank[width]), default=0)
        hi = min((i for w, i in least.items() if rank[w] > rank[width]), default=len(ratios) - 1)
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = Candidate(ratios[mid], *width)
            best = min((t.file_bytes for t in trials if t.met), default=None)
            if best is not None and expected_bytes(candidate, trials) >= best:
                hi = mid - 1  # this ratio and every larger one would make a bigger file than the best
                continue
            expected = sum(t.seconds for t in trials) / len(trials) if trials else 0.0
            if out_of_time(expected) or len(trials) >= MAX_TRIALS:
                return trials, True
            t = trial(candidate)
            trials.append(t)
            if t.met:
                least[width], hi = mid, mid - 1
            else:
                lo = mid + 1
                if mid == len(ratios) - 1:
                    hopeless.add(width)
    return trials, False


def expected_bytes(candidate: Candidate, trials: list[Trial]) -> float:
    """A candidate's file size, scaled from the last trial of its bit width (else the last trial) by kept ratio ×
    (key bits + value bits): on the corpus the whole cache at 8/8, 4/4 and 3/3 bits measured 23.5, 11.9 and
    8.8 MB, in proportion 16 : 8 : 6 within 1%."""
    if not trials:
        return 0.0
    width = (candidate.key_bits, candidate.bits)
    ref = next((t for t in reversed(trials) if (t.candidate.key_bits, t.candidate.bits) == width), trials[-1])

    def cost(c: Candidate) -> float:
        return c.ratio * (c.key_bits + c.bits)

    return ref.file_bytes * cost(candidate) / cost(ref.candidate)


def allowed_ratios(pre: Prefilled) -> tuple[float, ...]:
    """RATIOS that keep at least the chat template and attention sinks every head keeps."""
    visible = visible_positions(pre.geometry)
    floor = float((visible & protected_positions(pre.layout)).sum() / visible.sum())
    return tuple(r for r in RATIOS if r >= floor) or (1.0,)


def _trial(pre: Prefilled, prune: Callable[[float], Pruning | None], quant: QuantOptions, check: SelfCheck,
           target: Target, candidate: Candidate, path: Path) -> Trial:
    started = time.perf_counter()
    made = _write(pre, prune, quant, candidate, path)
    with kvc_attention_in(pre.lm.model):
        result = check.run(load(path, pre.lm).cache)
    path.unlink()
    return Trial(candidate, made.file_bytes, result, target.met(result), time.perf_counter() - started)


def _write(pre: Prefilled, prune: Callable[[float], Pruning | None], quant: QuantOptions, candidate: Candidate,
           path: Path, calibration: dict | None = None) -> CompressResult:
    if candidate.bits == 16:
        return write_kvc(pre, path, codec="zstd", bits=16, pruning=prune(candidate.ratio), calibration=calibration)
    return write_kvc(pre, path, codec="ans", bits=candidate.bits, pruning=prune(candidate.ratio),
                     quant=replace(quant, key_bits=candidate.key_bits), calibration=calibration)
