"""The trial loop: suggest -> plan -> (fit) -> materialise -> score slice by slice (pruning) -> store.

`StudyRunner(cfg)` is a Workbench (sources, space, calibration set loaded once) that runs trials of
an open study until a number of searched trials is counted in the storage, all workers together.
A trial stores what it measured in one user attribute (records.TRIAL_KEY), one storage call. A
candidate that fails (NaN, out of memory, evaluator crash) becomes a FAILED trial with its reason;
ten failures in a row stop the study, since the cause is then not the candidates.
"""

from __future__ import annotations

import gc
import logging
import math
import time

import optuna
import torch
from optuna.trial import TrialState

from mergesearch.errors import CandidateError, StudyError
from mergesearch.study import records
from mergesearch.study.owners import owner_record
from mergesearch.study.workbench import PrunedWithRecord, Workbench, failure_reason

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 10  # then the cause is not the candidates: stop instead of burning the budget


class StudyRunner(Workbench):
    """Runs trials of one study in this process (see study.opening for creating or resuming it)."""

    def objective(self, trial: optuna.Trial) -> list[float] | float:
        # first, so that a run finding this trial RUNNING after this process died fails it at once
        trial.set_user_attr(records.OWNER_KEY, owner_record(trial.number))
        values_in = self.space.suggest(trial)
        if self.fit_stage is not None:
            values_in.update(self.fit_stage.knobs.suggest(trial))
        fitted, fit_s = None, None
        try:
            plan = self.plan_for(values_in)
            if self.fit_stage is not None:
                t0 = time.perf_counter()
                _, plan, fitted = self.fit_stage.run(plan, values_in)
                if self.device.startswith("cuda"):  # the fit's last weight write may still be queued
                    torch.cuda.synchronize(self.device)
                fit_s = time.perf_counter() - t0
            values, rec = self.score_plan(plan, trial)
        except optuna.TrialPruned as exc:
            trial.set_user_attr(records.TRIAL_KEY, exc.record if isinstance(exc, PrunedWithRecord) else {})
            raise
        except Exception as exc:  # noqa: BLE001 - one bad candidate (NaN, OOM, evaluator crash) must not end the study
            reason = failure_reason(exc)
            trial.set_user_attr(records.TRIAL_KEY, {"fail_reason": reason, "device": self.device})
            log.warning("trial %d failed: %s", trial.number, reason)
            raise CandidateError(reason) from exc
        if fitted is not None:
            rec[records.FIT_KEY] = fitted
            rec["fit_s"] = fit_s
        trial.set_user_attr(records.TRIAL_KEY, rec)
        if self.fault_hook:
            self.fault_hook("store")
        return values if self.per_task else values[0]

    def release_failed_trial(self) -> None:
        """Free what a failed trial left behind before the next one starts. The CandidateError chains the
        original error, whose traceback frames hold the trial's tensors (activations, a fit's autograd
        graph) in a reference cycle with Optuna's trial machinery: alive until the cyclic collector runs,
        which the study leaves to itself (gc_after_trial=False: a collection costs every trial). After an
        out-of-memory on a GPU the next trial would start without that memory; the allocator's cached
        blocks go back to the device too."""
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def optimize(self, study: optuna.Study, target: int | None, *, timeout: float | None = None,
                 progress: bool = True) -> None:
        """Run trials until `target` searched trials are counted in the storage (all workers together)."""
        from tqdm.auto import tqdm

        done = records.counted(study)
        if target is not None and self.n_search_params == 0 and target > 1:
            log.info("nothing is searched (every parameter fixed): one trial is the whole study")
            target = max(1, done)
        if target is not None and done >= target:
            return
        bar = tqdm(total=target, initial=done, desc=f"study {study.study_name}", unit="trial", disable=not progress,
                   dynamic_ncols=True)
        # Per-trial bookkeeping stays flat as the study grows: a best-so-far updated from each finished
        # trial, never a scan of every trial, and one count of the stored trials (the storage's cache
        # answers it incrementally; it includes other workers' trials, which may finish in any order,
        # so the shared target is checked after every trial).
        best = max((records.trial_mean(t) for t in records.best_trials(study, 1, feasible_only=False)),
                   default=-math.inf)
        state = {"failed_in_a_row": 0, "best": best}

        def callback(st: optuna.Study, ft: optuna.trial.FrozenTrial) -> None:
            state["failed_in_a_row"] = state["failed_in_a_row"] + 1 if ft.state == TrialState.FAIL else 0
            if ft.state == TrialState.FAIL:
                self.release_failed_trial()
            if state["failed_in_a_row"] >= MAX_FAILURES_IN_A_ROW:
                raise StudyError(f"the last {state['failed_in_a_row']} candidates all failed (last: "
                                 f"{records.record(ft).get('fail_reason', 'no reason stored')}): fix the cause, then "
                                 "resume with the same command")
            if ft.state == TrialState.COMPLETE:
                state["best"] = max(state["best"], records.trial_mean(ft))
            n = records.counted(st)
            if progress:
                bar.n = n
                bar.set_postfix(best=f"{state['best']:.4f}", last=ft.state.name.lower(), refresh=False)
                bar.refresh()
            if target is not None and n >= target:
                st.stop()

        try:
            study.optimize(self.objective, n_trials=None if target is None else max(0, target - done) * 4 + 4,
                           timeout=timeout, callbacks=[callback], catch=(CandidateError,), gc_after_trial=False)
        finally:
            bar.close()
