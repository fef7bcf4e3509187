"""The pipeline's one progress line format: ``[dus] <where>: <message>``, flushed at once so it
interleaves correctly with the Trainer's and the launcher's output; and ``progress``, the one
progress display every loop of ours uses: tqdm bars on a terminal, plain lines in a file.

A tqdm bar redraws itself with carriage returns; written to a file (a CI log, a SLURM job's
``.out``) that becomes one line of hundreds of kilobytes. So when stderr is not a terminal,
``progress`` prints a plain line (done/total, rate, ETA, the postfix such as the loss) each time
another 5 % is done or 30 s have passed, and one at the end. ``DUS_PROGRESS=bars|lines|off``
overrides the choice. The libraries' own bars (transformers loading weights, datasets' ``map``,
TRL's label building, the GGUF dequantizer) are switched off in that case by
``quiet_library_bars_off_terminal``, which ``import pipeline`` calls before any library loads.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, Optional

PROGRESS_ENV = "DUS_PROGRESS"
PROGRESS_MODES = ("bars", "lines", "off")
LINE_EVERY_S = 30.0
LINE_EVERY_FRACTION = 0.05
# Read by tqdm (its defaults, at import), datasets and huggingface_hub (transformers follows the
# hub's switch) when they are imported; children (accelerate launch's ranks) inherit them.
LIBRARY_BAR_SWITCHES = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                        "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def log(msg: str, *, where: str | None = None) -> None:
    print(f"[dus] {where}: {msg}" if where else f"[dus] {msg}", flush=True)


def progress_mode(stream=None) -> str:
    """``bars`` on a terminal, ``lines`` otherwise (or what ``DUS_PROGRESS`` says)."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in PROGRESS_MODES:
        return forced
    stream = sys.stderr if stream is None else stream
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def quiet_library_bars_off_terminal() -> None:
    """Off a terminal, switch off the libraries' carriage-return bars (our loops print lines).
    A switch the user set already is kept."""
    if progress_mode() == "bars":
        return
    for name, value in LIBRARY_BAR_SWITCHES.items():
        os.environ.setdefault(name, value)


def progress(iterable: Optional[Iterable] = None, *, total: float | None = None, desc: str = "", unit: str = "it",
             unit_scale: bool = False, unit_divisor: int = 1000, disable: bool = False, **bar_options):
    """A tqdm bar on a terminal, a ``LineProgress`` otherwise; the same calls work on both
    (iteration, ``update``, ``set_postfix``, ``write``, ``close``, ``with``). ``bar_options`` go
    to tqdm only (``mininterval``, ``leave``, ``dynamic_ncols``...)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    mode = "off" if disable else progress_mode()
    if mode == "bars":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, unit_divisor=unit_divisor,
                    **bar_options)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, unit_divisor=unit_divisor,
                        disable=mode == "off")


class LineProgress:
    """Progress as plain ``[dus] desc: ...`` lines on stderr, at most one per 5 % or per 30 s."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", unit_scale: bool = False, unit_divisor: int = 1000, initial: float = 0,
                 disable: bool = False, stream=None, every_s: float = LINE_EVERY_S,
                 every_fraction: float = LINE_EVERY_FRACTION, clock=time.monotonic):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.unit_scale, self.unit_divisor, self.disable = unit_scale, unit_divisor, disable
        self.stream, self.every_s, self.every_fraction, self.clock = stream, every_s, every_fraction, clock
        self.n = self.initial = initial
        self.postfix = ""
        self.start = self.last_t = clock()
        self.last_n = initial
        self.next_mark = self._mark_after(initial)
        self.closed = False

    # tqdm's interface, the part our loops use
    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        if self.total and self.n >= self.total and self.last_n < self.total:
            self._emit(now, final=True)
        elif (self.next_mark is not None and self.n >= self.next_mark) or now - self.last_t >= self.every_s:
            self._emit(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def write(self, s: str) -> None:
        if not self.disable:
            self._print(f"[dus] {self.desc}: {s}" if self.desc else f"[dus] {s}")

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n != self.last_n:
            self._emit(self.clock(), final=True)

    # the lines
    def _mark_after(self, n: float) -> float | None:
        if not self.total:
            return None
        step = self.total * self.every_fraction
        return (int(n / step) + 1) * step

    def _emit(self, now: float, *, final: bool = False) -> None:
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else None
        parts = [self._amount()]
        if rate:
            parts.append(f"{self._fmt(rate)}{self.unit}/s" if self.unit_scale
                         else f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
        if final:
            parts.append(f"done in {_fmt_time(elapsed)}")
        else:
            if rate and self.total:
                parts.append(f"ETA {_fmt_time(max(0.0, self.total - self.n) / rate)}")
            parts.append(f"elapsed {_fmt_time(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        self.write(", ".join(parts))
        self.last_t, self.last_n = now, self.n
        self.next_mark = self._mark_after(self.n)

    def _amount(self) -> str:
        if self.unit_scale:
            done = f"{self._fmt(self.n)}{self.unit}"
            return f"{done} / {self._fmt(self.total)}{self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else done
        n = int(self.n) if float(self.n).is_integer() else round(self.n, 2)
        if self.total:
            return f"{self.unit} {n}/{int(self.total)} ({100 * self.n / self.total:.0f}%)"
        return f"{self.unit} {n}"

    def _fmt(self, x: float) -> str:
        if not self.unit_scale:
            return f"{x:.2f}"
        div = float(self.unit_divisor)
        prefixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi"] if self.unit_divisor == 1024 else ["", "k", "M", "G", "T", "P"]
        for p in prefixes:
            if abs(x) < div or p == prefixes[-1]:
                return f"{x:.1f} {p}" if p else f"{x:.0f} "
            x /= div
        return f"{x:.1f}"  # pragma: no cover

    def _print(self, line: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(line, file=stream, flush=True)


def _fmt_time(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
