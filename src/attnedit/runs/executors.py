"""Executors: where the work units of a run are computed. The local loop (in ``runner`` and ``analyses``)
is the default; ``fan_out`` computes them on Ray actors (``--backend ray``).

A work unit is what one worker computes without the others: a case (single mode, an analysis), a group of
cases sharing one edit (batch mode), or the single-mode cases whose fluency is decoded in one batch. The
driver keeps the run directory: it sends units to the actors and hands each finished unit's result to the
caller (``on_result``), which writes its records once, after the unit returned, with the run's
``RunDir`` (the single writer). A killed driver thus loses only units in flight, and a rerun of the same
command resumes as a local run does.

Each actor loads the model once (``WorkerFactory``), with torch threads = its CPUs. The one-time work of
the editor (context templates, covariance statistics) is done first, by one actor, for the first unit
(``UnitRunner.prepare``: nothing is edited); the driver then puts that actor's in-memory caches into Ray's
object store and every actor installs them under the same keys (``editing.templates``/
``editing.covariance`` ``cache_entries``) before its first unit, so no other worker recomputes them, no
shared file system is assumed, and every worker starts a unit at once.

Faults: a unit whose actor dies (process killed, out of memory) is given to a new actor, at most
``max_retries`` times; after that it is reported in ``FanOutReport.failed``. An actor that dies preparing
is replaced as often; when every try died, ``PrepareFailedError`` stops the run before any unit. An error
raised by the unit's own code (bad input, a non-finite loss) stops the run as it would locally.

Ray is optional (``pip install 'attnedit[ray]'``); this module imports it only when a run asks for it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypedDict, TypeVar

from attnedit.core.extras import MissingExtraError, missing_extra_error, missing_modules

if TYPE_CHECKING:
    from types import ModuleType

    import torch

    from attnedit.core.models import ModelBundle
    from attnedit.editing.covariance import MomentsKey
    from attnedit.editing.templates import TemplateSpec

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_EXTRA = "ray"  # the optional extra of pyproject.toml that installs Ray (core.extras.EXTRAS)

U = TypeVar("U")  # a work unit
T = TypeVar("T")  # what computing a unit gives the driver
U_contra = TypeVar("U_contra", contravariant=True)
T_co = TypeVar("T_co", covariant=True)


class RayMissingError(MissingExtraError):
    """``--backend ray`` without Ray installed."""


class UnitsFailedError(RuntimeError):
    """Some work units failed on every try (their actors died); the other cases were written."""


class PrepareFailedError(UnitsFailedError):
    """Every actor given the run's one-time work died doing it: no unit was started (all failed)."""


def require_ray() -> ModuleType:
    """The ``ray`` module, or ``RayMissingError``: one line saying how to install it (the message of every
    missing extra, ``core.extras``)."""
    missing = missing_modules(RAY_EXTRA)
    if missing:
        raise RayMissingError(str(missing_extra_error(RAY_EXTRA, "--backend ray", missing)))
    try:
        import ray
    except ImportError as err:  # found, but it does not import: a broken installation
        raise RayMissingError(
            f"--backend ray: ray is installed but does not import ({err}); reinstall it: "
            "pip install --force-reinstall ray"
        ) from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How a run fans out: ``workers`` actors of ``cpus_per_worker`` CPUs (= their torch threads) and
    ``gpus_per_worker`` GPUs; ``address`` None starts a local Ray instance, ``auto`` joins the running
    cluster, anything else is a cluster address; a unit whose actor dies is tried again at most
    ``max_retries`` times. ``crash_once`` (tests only): a file path; the first actor to start a unit
    creates it and exits at once, as a killed worker process does."""

    workers: int = 2
    address: str | None = None
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_retries: int = 2
    crash_once: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.cpus_per_worker <= 0:
            raise ValueError("--cpus-per-worker must be positive")
        if self.gpus_per_worker < 0:
            raise ValueError("--gpus-per-worker must be at least 0")
        if self.max_retries < 0:
            raise ValueError("--max-retries must be at least 0")

    @property
    def threads(self) -> int:
        """torch threads of one actor: its CPUs (at least one)."""
        return max(1, int(self.cpus_per_worker))

    @property
    def device(self) -> str:
        """Where an actor puts its model."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


class UnitRunner(Protocol[U_contra, T_co]):
    """What a worker computes: the loaded model (``bundle``, whose caches are shared) and one unit."""

    @property
    def bundle(self) -> ModelBundle: ...

    def __call__(self, unit: U_contra, /) -> T_co: ...

    def prepare(self, unit: U_contra, /) -> None:
        """The one-time work ``unit`` needs (into ``bundle``'s caches), without computing the unit."""


class WorkerFactory(Protocol[U_contra, T_co]):
    """Builds a worker's ``UnitRunner`` inside the actor (loads the model there, once); picklable."""

    def __call__(self, device: str) -> UnitRunner[U_contra, T_co]: ...


class CacheEntries(TypedDict):
    """An actor's one-time work, as the caches key it (``editing.templates``/``editing.covariance``
    ``cache_entries``)."""

    templates: dict[TemplateSpec, list[str]]
    moments: dict[MomentsKey, torch.Tensor]


@dataclass
class FailedUnit:
    """A unit that failed on every try: its case ids and the last error."""

    case_ids: list[str]
    error: str
    tries: int


@dataclass
class FanOutReport:
    """What ``fan_out`` did: units finished and failed, and the actors that died."""

    finished: int = 0
    failed: list[FailedUnit] = field(default_factory=list)
    actors_lost: int = 0


class _Worker(Generic[U, T]):
    """The body of a Ray actor: a model loaded once, units computed one after another."""

    def __init__(
        self, factory: WorkerFactory[U, T], threads: int, device: str, crash_once: str | None
    ) -> None:
        import torch

        torch.set_num_threads(threads)
        self.crash_once = crash_once
        self.runner = factory(device)

    def prepare(self, unit: U) -> None:
        """The one-time work of ``unit`` (``UnitRunner.prepare``)."""
        self.runner.prepare(unit)

    def run(self, unit: U) -> T:
        if self.crash_once is not None:
            try:
                os.close(os.open(self.crash_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)  # fault injection (tests): die mid-unit as a killed process does
        return self.runner(unit)

    def cache_entries(self) -> CacheEntries:
        """The one-time work done so far (context templates, second moments), keyed as the caches key it."""
        from attnedit.editing import covariance, templates

        bundle = self.runner.bundle
        return {"templates": templates.cache_entries(bundle), "moments": covariance.cache_entries(bundle)}

    def install_cache(self, entries: CacheEntries) -> None:
        """Install what another actor computed (``cache_entries``)."""
        from attnedit.editing import covariance, templates

        bundle = self.runner.bundle
        templates.install_cache_entries(bundle, entries["templates"])
        covariance.install_cache_entries(bundle, entries["moments"])


def _connect(ray: ModuleType, options: RayOptions) -> bool:
    """Join or start Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    if options.address is None:
        cpus = max(1, int(options.workers * options.cpus_per_worker + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        ray.init(address=options.address, logging_level=logging.WARNING)
    return True


def _first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dead_actor_errors(ray: ModuleType) -> tuple[type[BaseException], ...]:
    """The errors by which Ray reports that a unit's actor died (not that the unit's code raised)."""
    exc = ray.exceptions
    names = ("RayActorError", "ActorDiedError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError")
    return tuple(getattr(exc, n) for n in names if hasattr(exc, n))


def fan_out(
    units: Sequence[U],
    factory: WorkerFactory[U, T],
    on_result: Callable[[U, T], None],
    case_ids: Callable[[U], list[str]],
    options: RayOptions,
) -> FanOutReport:
    """Compute ``units`` on ``options.workers`` Ray actors; ``on_result(unit, result)`` is called in the
    driver once per finished unit (in the order they finish). One actor first does the one-time work
    (for the first unit), which every actor then installs from the object store."""
    ray = require_ray()
    started = _connect(ray, options)
    try:
        return _Driver(ray, units, factory, on_result, case_ids, options).run()
    finally:
        if started:
            ray.shutdown()


class _Driver(Generic[U, T]):
    """The scheduling loop of ``fan_out``: one unit in flight per actor (Ray's actor handles and object
    references are untyped: ``Any``)."""

    def __init__(
        self,
        ray: ModuleType,
        units: Sequence[U],
        factory: WorkerFactory[U, T],
        on_result: Callable[[U, T], None],
        case_ids: Callable[[U], list[str]],
        options: RayOptions,
    ) -> None:
        self.ray, self.factory, self.on_result, self.case_ids, self.options = (
            ray,
            factory,
            on_result,
            case_ids,
            options,
        )
        self.queue: deque[int] = deque(range(len(units)))
        self.units = units
        self.tries = [0] * len(units)
        self.actor_class = ray.remote(_Worker).options(
            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker, max_restarts=0
        )
        self.shared: Any = None  # the object-store reference of the one-time work, once done
        self.report = FanOutReport()

    def _new_actor(self) -> Any:
        o = self.options
        actor = self.actor_class.remote(self.factory, o.threads, o.device, o.crash_once)
        if self.shared is not None:
            actor.install_cache.remote(self.shared)  # runs before any unit sent to it (actor order)
        return actor

    def run(self) -> FanOutReport:
        ray, dead = self.ray, _dead_actor_errors(self.ray)
        if not self.queue:
            return self.report
        idle = [self._prepared_actor(dead)]
        idle += [self._new_actor() for _ in range(self.options.workers - 1)]  # each installs the caches
        flight: dict[Any, tuple[int, Any]] = {}  # object ref -> (unit index, actor)
        while self.queue or flight:
            while idle and self.queue:
                i = self.queue.popleft()
                actor = idle.pop()
                self.tries[i] += 1
                flight[actor.run.remote(self.units[i])] = (i, actor)
            ready, _ = ray.wait(list(flight), num_returns=1)
            ref = ready[0]
            i, actor = flight.pop(ref)
            try:
                result = ray.get(ref)
            except dead as err:
                self._lost(i, actor, err)
                idle.append(self._new_actor())
                continue
            except ray.exceptions.RayTaskError as err:
                raise err.as_instanceof_cause() from None  # the unit's own error: as a local run
            self.on_result(self.units[i], result)
            self.report.finished += 1
            idle.append(actor)
        for actor in idle:
            ray.kill(actor)
        return self.report

    def _prepared_actor(self, dead: tuple[type[BaseException], ...]) -> Any:
        """An actor that has done the one-time work of the first unit, shared (``self.shared``) with every
        actor made after it; one that dies doing it is replaced, at most ``max_retries`` times."""
        first, problem = self.units[self.queue[0]], ""
        for tries in range(1, self.options.max_retries + 2):
            actor = self._new_actor()
            try:
                self.ray.get(actor.prepare.remote(first))
            except dead as err:
                self.report.actors_lost += 1
                self.ray.kill(actor)
                problem = _first_line(err)
                again = ": trying again" if tries <= self.options.max_retries else ""
                logger.warning("a worker died preparing the run (%s)%s", problem, again)
                continue
            except self.ray.exceptions.RayTaskError as err:
                raise err.as_instanceof_cause() from None  # the preparation's own error: as a local run
            self.shared = self.ray.put(self.ray.get(actor.cache_entries.remote()))
            return actor
        raise PrepareFailedError(
            f"every worker preparing the run died ({tries} tries; last: {problem}); no case was computed"
        )

    def _lost(self, i: int, actor: Any, err: BaseException) -> None:
        """A unit's actor died: retry the unit (on a new actor) or report it failed."""
        self.report.actors_lost += 1
        self.ray.kill(actor)
        ids = self.case_ids(self.units[i])
        first_line = _first_line(err)
        if self.tries[i] <= self.options.max_retries:
            logger.warning("a worker died during case(s) %s (%s): trying again", ids, first_line)
            self.queue.appendleft(i)
        else:
            logger.error("case(s) %s failed %d time(s): %s", ids, self.tries[i], first_line)
            self.report.failed.append(FailedUnit(ids, f"{type(err).__name__}: {first_line}", self.tries[i]))
