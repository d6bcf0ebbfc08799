"""`describe`: the kernel decisions as the table `bloom-runtime info` prints."""

from __future__ import annotations

from .selection import TIMED_ROWS, Decision


def describe(decisions: list[Decision]) -> str:
    """One block per problem: each candidate, whether it was correct here (its error, or why
    not), its times at the timed row counts, and which row counts it serves."""
    lines = []
    for decision in decisions:
        contended = ", timed under load from other processes: not cached" if decision.contended else ""
        lines.append(f"{decision.problem.key()}  ({decision.source}{contended})")
        for trial in decision.trials:
            served = [str(rows) for rows, name in decision.serves.items() if name == trial.name]
            times = "  ".join(f"{rows}:{trial.ms[rows]:.3f}" for rows in TIMED_ROWS if rows in trial.ms)
            verdict = f"correct (error {trial.error:.2g})" if trial.correct and trial.error is not None \
                else "correct" if trial.correct else f"not used: {trial.why}"
            serve = f"  serves rows ~{','.join(served)}" if served else ""
            lines.append(f"    {trial.name:<16} {verdict}" + (f"  ms {times}" if times else "") + serve)
    return "\n".join(lines)
