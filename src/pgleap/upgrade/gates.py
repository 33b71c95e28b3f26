"""The gates in front of cutover: each says whether it holds and, when not, what holds it shut."""

from __future__ import annotations

from dataclasses import dataclass

from pgleap.upgrade.replay.journal import flag_label


@dataclass(frozen=True)
class Gate:
    """One condition cutover needs."""

    name: str
    open: bool
    detail: str


@dataclass(frozen=True)
class GateInputs:
    """What the gates are decided from (gathered by the state machine)."""

    mirroring_seconds: float  # time since mirroring began (or last fell back to it)
    validation_duration: float  # config: how long the error rate must hold
    error_threshold: float  # config
    error_rate: float | None  # compared reads that failed, over the sliding window; None: nothing compared
    compare_results: bool  # config
    verified_tables: int
    differing_tables: int
    lag_seconds: float | None  # None: replay not running
    max_lag_seconds: float
    # Tables replay flagged because the target may lack or repeat a transaction there (one skipped under
    # skip_and_resync, say): until their re-sync, the last verification round says nothing about them.
    must_resync: tuple[str, ...] = ()


def cutover_gates(inputs: GateInputs) -> list[Gate]:
    """Every gate, open or shut, in the order a DBA would look at them."""
    lag = inputs.lag_seconds
    gates = [
        Gate(
            "replay_lag",
            lag is not None and lag <= inputs.max_lag_seconds,
            "replay is not running" if lag is None else f"lag {lag:.2f}s (bound {inputs.max_lag_seconds:g}s)",
        ),
        Gate(
            "verification",
            inputs.verified_tables > 0 and inputs.differing_tables == 0,
            "no table verified yet"
            if inputs.verified_tables == 0
            else f"{inputs.differing_tables} of {inputs.verified_tables} tables differ",
        ),
        Gate(
            "resync",
            not inputs.must_resync,
            "no table waits for a re-sync"
            if not inputs.must_resync
            else f"{len(inputs.must_resync)} tables must be re-synced first (a transaction skipped or applied "
            f"without its place known): {', '.join(map(flag_label, inputs.must_resync[:5]))}; pgleap re-syncs "
            f"them with resync_on_error, or run FORCE RESYNC TABLE, or VERIFY (a clean check clears them); "
            f"INITIATE CUTOVER FORCE goes without",
        ),
        Gate(
            "validation_duration",
            inputs.mirroring_seconds >= inputs.validation_duration,
            f"mirroring for {inputs.mirroring_seconds:.0f}s of {inputs.validation_duration:.0f}s",
        ),
    ]
    if inputs.compare_results:
        rate = inputs.error_rate
        gates.append(
            Gate(
                "error_rate",
                rate is not None and rate <= inputs.error_threshold,
                "no read compared yet"
                if rate is None
                else f"error rate {rate:.4%} (threshold {inputs.error_threshold:.4%})",
            )
        )
    return gates


def shut(gates: list[Gate]) -> list[Gate]:
    """The gates that do not hold."""
    return [g for g in gates if not g.open]


def describe(gates: list[Gate]) -> str:
    """ "name: detail; ..." of `gates`, for refusals, transitions and status."""
    return "; ".join(f"{g.name}: {g.detail}" for g in gates)
