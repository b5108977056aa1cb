"""Stopping a trial at an epoch boundary. ASHA's "stop" would reach a trial only after its Train workers had
run on, and Tune would then kill them mid-epoch. Here the scheduler hands every decision to a small actor
(:class:`SweepCoordinator`); after each epoch's report the trial's workers wait for the decision on that epoch
(:class:`TrialSession`) and leave the loop when it is "stop", so the trial ends by itself, flushed and
closed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from pipeline.common import say
from pipeline.ray_runtime import RaySession


@ray.remote(num_cpus=0)
class SweepCoordinator:
    """The driver's hand-offs to running trials: each trial's MLflow run id (the driver opens the runs) and
    the scheduler's decision on each (trial, epoch), which the trial's Train workers wait on. The first
    decision on an epoch stands (Tune repeats a trial's last result when the trial ends)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, int], Any] = {}
        self._events: dict[tuple[str, str, int], asyncio.Event] = {}

    def _event(self, key: tuple[str, str, int]) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    async def _put(self, key: tuple[str, str, int], value: Any) -> None:
        self._values.setdefault(key, value)
        self._event(key).set()

    async def _get(self, key: tuple[str, str, int], timeout_s: float) -> Any:
        if key not in self._values:
            try:
                await asyncio.wait_for(self._event(key).wait(), timeout_s)
            except TimeoutError:
                return None
        return self._values[key]

    async def set_run(self, trial_id: str, run_id: str) -> None:
        self._values[("run", trial_id, 0)] = run_id  # a restarted trial may get its run again
        self._event(("run", trial_id, 0)).set()

    async def get_run(self, trial_id: str, timeout_s: float) -> str | None:
        return await self._get(("run", trial_id, 0), timeout_s)

    async def decide(self, trial_id: str, epoch: int, keep_going: bool) -> None:
        await self._put(("decision", trial_id, int(epoch)), bool(keep_going))

    async def wait(self, trial_id: str, epoch: int, timeout_s: float) -> bool | None:
        """True: train on; False: stop; None: no decision within ``timeout_s``."""
        return await self._get(("decision", trial_id, int(epoch)), timeout_s)


def coordinator_name(sweep: str) -> str:
    return f"vae-tune-coordinator-{sweep}"


def actor(name: str):
    """The named Ray actor (the sweep's coordinator)."""
    return ray.get_actor(name)


class EpochBoundaryASHA(AsyncHyperBandScheduler):
    """ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning") whose decisions reach
    the
    trial's Train workers at the epoch boundary.

    Every decision on a result is sent to :class:`SweepCoordinator`; the workers wait for it after reporting
    the epoch and stop there when it is "stop". Tune is told CONTINUE, so the trial ends by itself (flushed,
    closed) instead of being killed; should a trial report a later epoch anyway, it is stopped the usual way.
    On restore, the rungs are rebuilt from the results the restored trials had reported (Tune does not save
    scheduler state).
    """

    def __init__(self, coordinator: str, **asha_kwargs: Any) -> None:
        super().__init__(**asha_kwargs)
        self._coordinator = coordinator
        self._coordinator_handle = None
        self._stopped_at: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_coordinator_handle"] = None  # actor handles are not pickled with the experiment
        return state

    def _send(self, trial_id: str, epoch: int, keep_going: bool) -> None:
        try:
            if self._coordinator_handle is None:
                self._coordinator_handle = actor(self._coordinator)
            self._coordinator_handle.decide.remote(trial_id, epoch, keep_going)
        except Exception as error:  # noqa: BLE001 - the workers then go on after their timeout
            say(f"[tune] could not send the decision on trial {trial_id} epoch {epoch}: {error}")

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        history = _reported_results(trial) if trial.last_result else []
        for result in history:  # a restored trial: replay what it reported into the rungs
            super().on_trial_result(tune_controller, trial, result)
        if history and trial.status == Trial.TERMINATED:
            super().on_trial_complete(tune_controller, trial, history[-1])

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr)
        if (
            epoch is None
            or result.get("done")
            or decision not in (TrialScheduler.STOP, TrialScheduler.CONTINUE)
        ):
            return decision
        stopped_at = self._stopped_at.get(trial.trial_id)
        if stopped_at is not None and epoch > stopped_at:
            return TrialScheduler.STOP  # its workers did not stop: stop the trial the usual way
        keep_going = decision == TrialScheduler.CONTINUE
        if not keep_going:
            self._stopped_at[trial.trial_id] = int(epoch)
            if epoch < self._max_t:
                say(
                    f"[tune] ASHA stops trial {trial.trial_id} after epoch {epoch} "
                    f"({self._metric} {result.get(self._metric, float('nan')):.4f})"
                )
        self._send(trial.trial_id, int(epoch), keep_going)
        return TrialScheduler.CONTINUE


def _reported_results(trial: Trial) -> list[dict[str, Any]]:
    """The results a (restored) trial reported, from its result.json in the sweep's storage."""
    try:
        storage = trial.storage
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/result.json") as stream:
            lines = stream.readall().decode().splitlines()
    except Exception:  # noqa: BLE001 - nothing reported yet, or not readable: nothing to replay
        return []
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    return results


class TrialSession(RaySession):
    """The Ray Train session of a Tune trial's worker: after each epoch's report, wait for the scheduler's
    decision."""

    def __init__(self, decisions: dict[str, Any]) -> None:
        super().__init__()
        self._decisions = decisions
        self._handle = None

    def should_continue(self, epoch: int) -> bool:
        try:
            if self._handle is None:
                self._handle = actor(self._decisions["actor"])
            keep_going = ray.get(
                self._handle.wait.remote(self._decisions["trial_id"], epoch, self._decisions["timeout_s"])
            )
        except Exception as error:  # noqa: BLE001 - no scheduler to ask (the driver is gone): train on
            say(
                f"[tune] no scheduler decision on epoch {epoch} "
                f"({type(error).__name__}: {error}); training on"
            )
            return True
        if keep_going is None:
            say(
                f"[tune] no scheduler decision on epoch {epoch} within "
                f"{self._decisions['timeout_s']:g}s; training on"
            )
            return True
        return keep_going
