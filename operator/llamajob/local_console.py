"""What `llamajob run` prints: phase and Event lines, a live progress bar (plain step lines when
not on a terminal), and the summary at the end."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from rich.markup import escape

from .api import LlamaTrainingJobStatus


class ConsoleUI:
    """Phase lines, fault lines and a live progress bar (plain lines when not on a terminal)."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.live = enabled and self.console.is_terminal
        self.bar: Any = None
        self.task: Any = None
        self.last_plain = 0.0
        self.last_plain_step: int | None = None

    def note(self, text: str) -> None:
        self.console.print(f"[dim]{_clock()}  {escape(text)}[/dim]")

    def event(self, type_: str, reason: str, message: str) -> None:
        style = "yellow" if type_ == "Warning" else "cyan"
        self.console.print(f"{_clock()}  [{style}]{reason:<16}[/{style}] {escape(message)}")

    def phase(self, status: LlamaTrainingJobStatus) -> None:
        self.console.print(
            f"{_clock()}  [bold]phase -> {status.phase}[/bold]"
            # Messages quote pod logs (e.g. "[.../pair.cc:152] ..."), which are not markup.
            + (f"  ({escape(status.message)})" if status.message else "")
        )

    def _fields(self, s: LlamaTrainingJobStatus) -> str:
        parts = [f"loss {s.loss:.4f}" if s.loss is not None else "loss -"]
        if s.validation_loss is not None:
            parts.append(f"validation {s.validation_loss:.4f}")
        parts.append(f"{s.tokens_per_second:,.0f} tok/s" if s.tokens_per_second else "- tok/s")
        parts.append(f"MFU {s.mfu:.1%}" if s.mfu is not None else "MFU -")
        if s.eta_seconds is not None:
            parts.append(f"ETA {s.eta_seconds:,.0f}s")
        return "  ".join(parts)

    def update(self, s: LlamaTrainingJobStatus) -> None:
        total = s.max_steps or 0
        step = s.step or 0
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            if self.bar is None and s.phase in {"Training", "Restarting"} and total:
                self.bar = Progress(
                    TextColumn("{task.fields[phase]:<10}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"),
                    console=self.console,
                    transient=False,
                )
                self.bar.start()
                self.task = self.bar.add_task("train", total=total, phase=s.phase, info="")
            if self.bar is not None:
                self.bar.update(self.task, completed=step, phase=s.phase, info=self._fields(s))
            return
        now = time.monotonic()
        fresh = s.step != self.last_plain_step
        if s.phase == "Training" and s.step is not None and fresh and now - self.last_plain >= 5:
            self.last_plain, self.last_plain_step = now, s.step
            self.console.print(f"{_clock()}  step {step}/{total}  {self._fields(s)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def print_summary(ui: ConsoleUI, summary: dict[str, Any]) -> None:
    c = ui.console
    style = "green" if summary["phase"] == "Succeeded" else "red"
    c.print()
    c.print(
        f"[bold]Job {summary['job']}[/bold]: [{style}]{summary['phase']}[/{style}]"
        + (f" ({escape(summary['message'])})" if summary.get("message") else "")
    )
    loss = summary["final_loss"]
    c.print(f"  steps       {steps_line(summary)}")
    word = summary.get("final_loss_non_finite")
    shown = f"{loss:.4f}" if loss is not None else f"{word} (diverged)" if word else "-"
    c.print(f"  final loss  {shown}")
    if (validation := summary.get("final_validation_loss")) is not None:
        c.print(f"  validation  {validation:.4f}")
    c.print(f"  restarts    {summary['restarts']}")
    c.print(f"  wall time   {summary['wall_seconds']:.1f} s")
    kept = ", ".join(summary["checkpoints"]) or "none"
    c.print(f"  checkpoints {kept} (in {summary['checkpoint_dir']})")


def steps_line(summary: dict[str, Any]) -> str:
    """`12/200`, or what happened when no training step ran (never `None/200`)."""
    step, total = summary.get("final_step"), summary.get("max_steps")
    if step is not None:
        return f"{step}/{total}"
    phase = summary.get("phase") or "stopped"
    return f"0/{total} (no training step ran: the job ended, {phase}, before its first one)"
