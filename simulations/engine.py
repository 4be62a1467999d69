"""Run the fedal apps on Flower's Simulation Engine (Ray) from Python.

``flwr run .`` is the way to run the app from its project folder. ``fedal simulate``
needs the same engine with settings chosen on the command line, without starting a
long-lived SuperLink: it writes a one-off Flower app folder whose
``[tool.flwr.app.config]`` holds the run's settings and hands it to the Simulation
Engine, which gives every ServerApp and ClientApp context that run config.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from fedal.config import FederationConfig
from fedal.exceptions import ConfigError
from fedal.fileio import toml_value

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def app_pyproject(cfg: FederationConfig) -> str:
    """A minimal Flower app ``pyproject.toml`` carrying ``cfg`` as its run config."""
    lines = [
        "[project]", 'name = "fedal-run"', 'version = "0.1.0"', "",
        "[tool.flwr.app]", 'publisher = "fedal"', "",
        "[tool.flwr.app.components]", 'serverapp = "server.app:app"', 'clientapp = "clients.app:app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in cfg.to_run_config().items()]
    return "\n".join(lines) + "\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_session(proc: Path, tag: str) -> bool:
    """Whether the process ``proc`` (a /proc entry) belongs to the Ray session whose name ends in ``tag``:
    its command line names the session, or one of its open files lies in it (Ray's agents rename their
    command line to ``ray::...`` but keep their logs open)."""
    try:
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if "/ray/session_" in cmd and tag in cmd:
            return True
        for fd in (proc / "fd").iterdir():
            target = os.readlink(fd)
            if "/ray/session_" in target and tag in target:
                return True
    except OSError:
        return False
    return False


def clean_orphaned_ray(registry: Path | None = None) -> list[int]:
    """Stop the Ray processes a killed fedal run left behind; return their process ids.

    Ray names its session after the process that started it (``session_<time>_<pid>``). Each
    simulation records its own pid in ``registry`` (default ``<cache>/ray-drivers``) and removes
    it when it ends; a pid still recorded but no longer running was killed (SIGKILL skips every
    cleanup), and the processes of its Ray session (named on their command line or in their open
    files) are stopped. Ray clusters that fedal did not start are never touched.
    """
    import signal

    from fedal.features import cache_dir

    registry = registry or cache_dir() / "ray-drivers"
    if not registry.is_dir():
        return []
    stopped = []
    for marker in registry.iterdir():
        if not marker.name.isdigit() or _alive(int(marker.name)):
            continue
        tag = f"_{marker.name}/"
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _in_session(entry, tag):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                    stopped.append(int(entry.name))
                except OSError:
                    pass
        marker.unlink(missing_ok=True)
    if stopped:
        logging.getLogger("fedal").warning("stopped %d Ray processes a killed run left behind", len(stopped))
    return stopped


def actors(cpus: int | None = None) -> int:
    """How many client actors a simulation runs: ``cpus``, else ``$FEDAL_CPUS``, else every core."""
    value = cpus or os.environ.get("FEDAL_CPUS") or os.cpu_count() or 2
    try:
        value = int(value)
    except ValueError:
        value = 0
    if value < 1:
        from fedal.exceptions import ConfigError

        raise ConfigError(f"FEDAL_CPUS must be a whole number of client actors >= 1, got {os.environ['FEDAL_CPUS']!r}")
    return value


#: a client actor's memory before any data (Python, torch, Flower, Ray's worker), and per byte of the data set
#: held as float32, fitted to the peaks ``simulations/bench/actor_memory.py`` measured (bench_actor_memory.md)
ACTOR_BASE_BYTES = {"head": 420 * 2**20, "network": 520 * 2**20, "handover": 640 * 2**20}
ACTOR_BYTES_PER_DATA_BYTE = 2.0
#: the share of the available memory a simulation may plan to use (Ray stops actors at 95% of the machine's)
MEMORY_SHARE = 0.85


def actor_memory_estimate(cfg: FederationConfig, dataset=None) -> int:
    """Bytes one client actor of a simulation of ``cfg`` is expected to hold at its peak: a base for the
    pipeline plus a multiple of the data set's size as float32 (an actor serves every client in turn and
    keeps the data set and the pools' features it computed)."""
    import numpy as np

    if dataset is None:
        from fedal.federation import federation_dataset

        dataset = federation_dataset(cfg)
    values = (len(dataset.y_train) + len(dataset.y_test)) * int(np.prod(dataset.input_shape))
    return int(ACTOR_BASE_BYTES.get(cfg.pipeline, ACTOR_BASE_BYTES["network"]) + ACTOR_BYTES_PER_DATA_BYTE * 4 * values)


def available_memory() -> int | None:
    """Bytes of memory available to new processes (``MemAvailable`` of /proc/meminfo), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: FederationConfig, n_actors: int, dataset=None, available: int | None = None) -> int:
    """Refuse a simulation whose ``n_actors`` client actors (and the ServerApp) would not fit in the memory
    available; return the bytes it is expected to need."""
    from fedal.exceptions import ConfigError

    per_actor = actor_memory_estimate(cfg, dataset)
    need = (n_actors + 1) * per_actor  # the driver (ServerApp, Flower, Ray) weighs about one actor
    available = available_memory() if available is None else available
    if available is not None and need > MEMORY_SHARE * available:
        fits = max(int(MEMORY_SHARE * available // per_actor) - 1, 0)
        gib = 2**30
        raise ConfigError(
            f"this simulation needs about {need / gib:.1f} GiB ({n_actors} client actors of about "
            f"{per_actor / gib:.2f} GiB each for the {cfg.pipeline} pipeline on {cfg.dataset}, and the server), but "
            f"{available / gib:.1f} GiB of memory are available; Ray would stop actors when the machine's memory is "
            f"95% used. " + (f"Run fewer client actors (FEDAL_CPUS={fits} fits), " if fits >= 1 else "")
            + "set max-train to use part of the data set, or free memory")
    return need


def ray_address(cfg: FederationConfig) -> str:
    """The address of the Ray cluster a simulation of ``cfg`` connects to (``ray-address``, else ``$RAY_ADDRESS``, as
    ``ray.init`` reads it), or "" where it starts a Ray of its own on this machine (``local``, or neither given)."""
    given = cfg.ray_address.strip()
    if given == "local":
        return ""
    return given or os.environ.get("RAY_ADDRESS", "").strip()


def placed(cfg: FederationConfig) -> FederationConfig:
    """``cfg`` as the client actors read it: on a cluster (:func:`ray_address`), every relative path made absolute
    against this process's folder (an actor on another node works in another folder); unchanged on this machine."""
    if not ray_address(cfg):
        return cfg
    from fedal.config import absolute_paths

    return FederationConfig.from_mapping(absolute_paths(cfg.to_run_config()))


def client_resources(cfg: FederationConfig) -> dict:
    """What Ray reserves for each client actor of a simulation of ``cfg`` (``actor-cpus``, ``actor-gpus``,
    ``actor-memory-gib``), in the keys of ``ray.remote``'s options."""
    resources = {"num_cpus": cfg.actor_cpus, "num_gpus": cfg.actor_gpus}
    if cfg.actor_memory_gib > 0:
        resources["memory"] = int(cfg.actor_memory_gib * 2**30)
    return resources


def backend_config(cpus: int | None = None, cfg: FederationConfig | None = None) -> dict:
    """The Simulation Engine's Ray settings for ``cfg`` (default: the default settings).

    On this machine (no ``ray-address``), Ray starts with ``cpus`` CPUs (default ``$FEDAL_CPUS``, else every core)
    and no GPU unless ``actor-gpus`` asks for one (then Ray finds them); on a cluster, Ray is joined as it is: the
    nodes say what they hold. Each client actor reserves ``actor-cpus`` (1: one actor per core, as on the reference
    machine), ``actor-gpus`` and ``actor-memory-gib``."""
    cfg = cfg or FederationConfig()
    init_args = {"logging_level": "ERROR", "log_to_driver": True, "include_dashboard": False}
    address = ray_address(cfg)
    if address:
        init_args["address"] = address  # a running cluster's resources are its own: Ray refuses num_cpus here
    else:  # "local": a Ray of this run's own, even where $RAY_ADDRESS names a cluster
        init_args.update(address="local", num_cpus=actors(cpus), num_gpus=None if cfg.actor_gpus > 0 else 0)
    return {"client_resources": client_resources(cfg), "init_args": init_args}


def actor_capacity(nodes: list[dict], resources: dict) -> int:
    """How many client actors reserving ``resources`` (:func:`client_resources`) the live nodes of ``nodes``
    (``ray.nodes()``) hold: on each node, the fewest its CPUs, its GPUs and its memory allow. Flower counts CPUs and
    GPUs only, and an actor beyond a node's memory would wait for it forever."""
    total = 0
    wants = {"CPU": resources.get("num_cpus", 1), "GPU": resources.get("num_gpus", 0),
             "memory": resources.get("memory", 0)}
    for node in nodes:
        held = node.get("Resources") or {}
        if not node.get("Alive", True) or not held:  # a node that left keeps its entry, with no resources
            continue
        total += min(int(held.get(key, 0) / need + 1e-9) for key, need in wants.items() if need > 0)
    return total


def no_room_message(nodes: list[dict], resources: dict) -> str:
    """Why no client actor reserving ``resources`` fits on any live node of ``nodes``, and what to change."""
    gib = 2**30
    held = [n.get("Resources") or {} for n in nodes if n.get("Alive", True) and n.get("Resources")]
    seen = "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}, memory {r.get('memory', 0) / gib:.1f} GiB"
                     for r in held) or "none alive"
    return (f"no node of the Ray cluster holds one client actor of actor-cpus {resources.get('num_cpus', 1):g}, "
            f"actor-gpus {resources.get('num_gpus', 0):g}, actor-memory-gib {resources.get('memory', 0) / gib:.2f} "
            f"(the nodes hold: {seen}); lower these settings (actor-gpus 0 runs on CPUs), or add a node that has them")


def run_in_simulation(cfg: FederationConfig, *, cpus: int | None = None, verbose: bool = False,
                      client_app=None) -> None:
    """Run the fedal ServerApp and ClientApps for ``cfg`` on the Simulation Engine.

    Ray and its client actors start for this run and stop after it; several runs in a row
    share them with :class:`SimulationRuntime`.

    Parameters
    ----------
    cfg : FederationConfig
        Run settings (also the run config every app receives).
    cpus : int, optional
        CPUs Ray may use (default: all cores).
    verbose : bool
        Show Flower's and Ray's logs.
    client_app : flwr.clientapp.ClientApp, optional
        ClientApp to run instead of ``clients.app:app`` (e.g. one with extra mods, as the
        privacy audit uses to see every reply).

    Raises
    ------
    RuntimeError
        If the ServerApp failed (the Simulation Engine's own error is chained).
    """
    with SimulationRuntime(cpus=cpus, verbose=verbose) as runtime:
        runtime.run(cfg, client_app=client_app)


class SimulationRuntime:
    """Flower's Simulation Engine kept up between federations: Ray and its client actors start once.

    For each simulation Flower 1.41 starts Ray (unless it is up), builds a pool of client actors
    (one per core) and, when the run ends, stops the actors and Ray (``RayBackend.terminate``):
    about 5 s of every short run, paid again by each run of ``fedal compare``. Inside ``with
    SimulationRuntime() as runtime``, each :meth:`run` is still a whole Flower simulation with its
    own SuperNodes, run config, ServerApp and ClientApp, but the first one's Ray and actor pool
    serve them all, and are stopped when the block ends.

    An actor is a process that executes ClientApp calls one after another, as it does for every
    client of one simulation: a client's state lives in its database, so what carries over from
    one run to the next is imported modules and the caches of pure functions (the data set, the
    partition, a pool's features), never a client's labels. After each run the actors are asked
    whether they are alive and idle; if one is not (a client killed its process), the pool is
    replaced for the next run.

    While it is open, the engine also looks for new messages every :data:`POLL_S` seconds instead
    of Flower's 0.1 s (the ServerApp for replies, the engine for messages to hand to the actors: a
    round waited for them four times), and the ServerApp's numerical libraries use one thread, as
    each actor does (two BLAS threads contending with the actors for two cores made the head
    pipeline's rounds slower, not faster). Flower's own objects are restored when the block ends.

    Parameters
    ----------
    cpus : int, optional
        CPUs Ray may use (default: all cores); one client actor per CPU.
    verbose : bool
        Show Flower's and Ray's logs.
    """

    _open: "SimulationRuntime | None" = None  # one runtime per process: Ray is one per process

    def __init__(self, *, cpus: int | None = None, verbose: bool = False) -> None:
        self.cpus, self.verbose = cpus, verbose
        self.runs = 0
        self.pools_built = 0  # actor pools built: 1 unless one had to be replaced
        self.actors_replaced = 0  # actors that died inside a run and were replaced there
        self.actors_lost = 0  # actors that died inside a run and could not be (their node left the cluster)
        self.placement_error: Exception | None = None  # why the actor pool could not be built
        self._pool = None
        self._marker: Path | None = None
        self._restore: list[tuple] = []
        self._placement: tuple | None = None  # the first run's (Ray address, actor resources): every run's

    def __enter__(self) -> "SimulationRuntime":
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.fleet.vce.backend import raybackend

        from fedal.features import cache_dir

        if SimulationRuntime._open is not None:
            raise RuntimeError("a SimulationRuntime is already open in this process; run the federations in it")
        if not self.verbose:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        clean_orphaned_ray()
        # removed on exit; left only by a killed process, whose Ray processes the next run stops
        self._marker = cache_dir() / "ray-drivers" / str(os.getpid())
        self._marker.parent.mkdir(parents=True, exist_ok=True)
        self._marker.touch()
        # the Simulation Engine looks both up in their modules when a run starts
        for module, name, replacement in ((raybackend, "RayBackend", _kept_backend(raybackend.RayBackend, self)),
                                          (vce_api, "add_messages_to_queue", _add_messages_to_queue)):
            self._restore.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)
        SimulationRuntime._open = self
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._drop_pool()
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            for module, name, original in self._restore:
                setattr(module, name, original)
            self._restore.clear()
            SimulationRuntime._open = None
            if self._marker is not None:
                self._marker.unlink(missing_ok=True)

    def run(self, cfg: FederationConfig, *, client_app=None) -> None:
        """Run the fedal ServerApp and ClientApps for ``cfg`` (see :func:`run_in_simulation`).

        Raises
        ------
        RuntimeError
            If the ServerApp failed (the Simulation Engine's own error is chained).
        """
        from threadpoolctl import threadpool_limits

        if SimulationRuntime._open is not self:
            raise RuntimeError("SimulationRuntime.run needs the runtime open: use `with SimulationRuntime() as r`")
        cfg = placed(cfg)
        if client_app is None:
            from clients.app import app as client_app

        if cfg.pipeline != "head":  # the ServerApp runs in this process, on one core as each client does
            import torch

            torch.set_num_threads(1)
        self._check_placement(cfg)
        if not ray_address(cfg):  # on a cluster, the nodes' own memory is what counts: actor-memory-gib reserves it
            check_memory(cfg, min(max(int(actors(self.cpus) / cfg.actor_cpus), 1), cfg.clients))
        if self._pool is None:
            self._join_ray(cfg)
        with threadpool_limits(1):
            try:
                result = _simulate(cfg, self.cpus, self.verbose, client_app, _server_app())
            except RuntimeError:
                result = None
                if self.placement_error is None:
                    raise
        self.runs += 1
        if self.placement_error is not None:
            error, self.placement_error = self.placement_error, None
            raise error
        if not getattr(result, "success", True):
            raise RuntimeError("the federation failed; run again with --verbose to see Flower's log")

    def _join_ray(self, cfg: FederationConfig) -> None:
        """Start Ray (or join the cluster) as the Simulation Engine does, and refuse a run whose client actor no
        node holds, before the ServerApp waits for replies that cannot come."""
        import ray
        from flwr.server.superlink.fleet.vce.backend import raybackend

        raybackend.RayBackend(backend_config(self.cpus, cfg))  # Flower's own ray.init (the kept backend's)
        nodes = ray.nodes()
        if actor_capacity(nodes, client_resources(cfg)) < 1:
            raise ConfigError(no_room_message(nodes, client_resources(cfg)))

    def _check_placement(self, cfg: FederationConfig) -> None:
        """Refuse a run whose Ray or actor settings differ from the first run's: Ray and the actors are kept."""
        placement = (ray_address(cfg), client_resources(cfg))
        if self._placement is None:
            self._placement = placement
        elif placement != self._placement:
            raise ConfigError(f"the runs of one fedal compare or --baseline share Ray and its client actors: this run "
                              f"asks for ray-address {placement[0] or 'local'!r} and actors of {placement[1]}, the "
                              f"first one for {self._placement[0] or 'local'!r} and {self._placement[1]}; give every "
                              f"run the same ray-address, actor-cpus, actor-gpus and actor-memory-gib")

    # ------------------------------------------------------------- the actor pool, for the backend below
    def pool_for(self, build):
        """The kept actor pool, built with ``build()`` the first time (or after a pool was dropped)."""
        if self._pool is None:
            self._pool = build()
            self.pools_built += 1
        return self._pool

    def release(self, pool) -> None:
        """A run ended: keep ``pool`` if every actor answers and is idle, else stop it (the next run builds one)."""
        import ray

        if pool is None:  # the pool was never built
            return
        healthy = pool is self._pool and len(pool.pool) == pool.num_actors
        if healthy:
            try:
                ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=ACTOR_CHECK_S)
            except Exception:  # a dead or hung actor: whatever Ray says, the pool is replaced
                healthy = False
        if not healthy:
            logging.getLogger("fedal").warning("a client actor did not survive the run; starting new ones")
            self._drop_pool()

    def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            import ray

            for actor in [*pool.pool, *getattr(pool, "_future_to_actor", {}).values()]:
                ray.kill(actor)


#: seconds a kept actor has to answer after a run before its pool is replaced
ACTOR_CHECK_S = 30.0
#: seconds between two looks for new messages while a :class:`SimulationRuntime` is open (Flower's: 0.1)
POLL_S = 0.01


def _kept_backend(flower_backend, runtime: SimulationRuntime):
    """Flower's ``RayBackend`` with its actor pool taken from (and given back to) ``runtime`` instead of
    built and stopped with every run. Ray itself: Flower's backend starts it only if it is not up, and
    :meth:`SimulationRuntime.__exit__` stops it."""

    class KeptRayBackend(flower_backend):
        def build(self, app_fn) -> None:
            def build_pool():
                try:
                    pool = waiting_actor_pool(self.client_resources, self.actor_kwargs)
                except ConfigError as exc:  # run() raises it in place of the Simulation Engine's crash
                    runtime.placement_error = exc
                    raise
                pool.add_actors_to_pool(pool.actors_capacity)
                return pool

            self.pool = runtime.pool_for(build_pool)
            self.app_fn = app_fn

        def terminate(self) -> None:
            runtime.release(self.pool)

        def process_message(self, message, context):
            """Flower's, but an actor that died (killed by Ray for memory, or its process gone) is replaced by a
            new one and the message handed to it once: Flower would put the dead actor back into the pool, and
            every later message it drew would fail."""
            import ray.exceptions

            try:
                return flower_backend.process_message(self, message, context)
            except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as ex:
                replaced, lost = replace_dead_actors(self.pool, ex)
                runtime.actors_replaced += replaced
                runtime.actors_lost += lost
            return flower_backend.process_message(self, message, context)

    return KeptRayBackend


def waiting_actor_pool(resources: dict, actor_kwargs: dict):
    """Flower's actor pool of as many actors reserving ``resources`` as the cluster's live nodes hold
    (:func:`actor_capacity`: memory counted too), whose ``submit`` waits for an idle actor where Flower's would fail.

    The Simulation Engine runs one thread per actor it started with; when a node leaves and its actors cannot be
    replaced (:func:`replace_dead_actors`), more threads than actors remain, and a message drawn by one of them waits
    for the next idle actor instead of failing its client.

    Raises
    ------
    fedal.exceptions.ConfigError
        If no live node holds one actor (:func:`no_room_message` says what the nodes hold).
    """
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    nodes = ray.nodes()
    capacity = actor_capacity(nodes, resources)
    if capacity < 1:
        raise ConfigError(no_room_message(nodes, resources))

    class WaitingActorPool(BasicActorPool):
        def submit(self, actor_fn, job):
            while True:
                try:
                    actor = self.pool.pop()  # atomic: the engine's threads draw from one list
                    break
                except IndexError:
                    if self.num_actors < 1:
                        raise RuntimeError("no client actor is left: the Ray nodes that held them are gone") from None
                    time.sleep(POLL_S)
            app_fn, message, cid, context = job
            future = actor_fn(actor, app_fn, message, cid, context)
            self._future_to_actor[future] = actor
            return future

    pool = WaitingActorPool(actor_type=ClientAppActor, client_resources=resources, actor_kwargs=actor_kwargs)
    pool.actors_capacity = capacity
    return pool


def replace_dead_actors(pool, error: BaseException | None = None) -> tuple[int, int]:
    """Replace every actor of Flower's ``pool`` that no longer answers by a new one where the cluster has room for
    it; return ``(replaced, lost)``: the actors replaced, and those left out (the pool runs with fewer).

    The Ray actors of a simulation run the ClientApps; one killed (Ray's memory monitor stops the process that
    takes the most memory when the machine runs short) never answers again, and Flower keeps it in its pool. A node
    that leaves a cluster takes its actors along, and the nodes left may hold no new one: a replacement that does
    not start within :data:`ACTOR_CHECK_S` is stopped, not waited for."""
    import ray

    dead = []
    for actor in list(pool.pool):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=ACTOR_CHECK_S)
        except Exception:  # noqa: BLE001 - dead or hung: replaced either way
            dead.append(actor)
    removed = []
    for actor in dead:
        try:
            pool.pool.remove(actor)
        except ValueError:  # another worker thread drew it meanwhile: its own failure replaces it
            continue
        removed.append(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    replaced = lost = 0
    for _ in removed:
        room = actor_capacity(ray.nodes(), pool.client_resources) - len(pool.pool) - len(pool._future_to_actor)
        new = pool.create_actor_fn() if room > 0 else None
        if new is not None:
            try:
                ray.get(new.__ray_ready__.remote(), timeout=ACTOR_CHECK_S)
            except Exception:  # noqa: BLE001 - no node could start it
                ray.kill(new, no_restart=True)
                new = None
        if new is None:
            pool.num_actors -= 1
            lost += 1
        else:
            pool.pool.append(new)
            replaced += 1
    if removed:
        reason = f" ({type(error).__name__}: {str(error).splitlines()[0][:200]})" if error is not None else ""
        logging.getLogger("fedal").warning(
            "%d client actor(s) died%s: %d replaced by new ones, %d not (no Ray node has room for them: the run goes "
            "on with %d); the message is handed to another actor", len(removed), reason, replaced, lost,
            pool.num_actors)
    return replaced, lost


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
    """The Simulation Engine's loop that hands each SuperNode's next message to the actors, looking every
    :data:`POLL_S` seconds, or as long as the last look took (many nodes: at most half a core).

    Flower's loop asks the LinkState for every node's next message, and each question scans every stored
    message: 1,000 nodes cost about 10^6 checks per look, a core's worth of the driver. Where the state is
    Flower's in-memory one, one pass over its stored messages says which nodes have one waiting, and only
    those are asked (the LinkState still hands them out, marking them delivered)."""
    while not f_stop.is_set():
        started = time.perf_counter()
        for node_id in _nodes_with_messages(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(max(POLL_S, time.perf_counter() - started))


def _nodes_with_messages(state, nodes_mapping):
    """The nodes of ``nodes_mapping`` with an undelivered message in ``state`` (all of them where the state
    does not show its store)."""
    store = getattr(state, "message_ins_store", None)
    if not isinstance(store, dict):
        return list(nodes_mapping)
    waiting = {m.metadata.dst_node_id for m in list(store.values()) if m.metadata.delivered_at == ""}
    return [node_id for node_id in nodes_mapping if node_id in waiting]


def _server_app():
    """fedal's ServerApp, looking for the clients' replies every :data:`POLL_S` seconds, up to Flower's 0.1 s
    from 100 clients on (the simulation's grid takes its ``pull_interval``)."""
    from flwr.serverapp import ServerApp

    from server.app import main

    app = ServerApp()

    @app.main()
    def simulated(grid, context) -> None:
        if hasattr(grid, "pull_interval"):  # each look checks every awaited reply: slower with many clients
            grid.pull_interval = min(POLL_S * max(1.0, int(context.run_config.get("clients", 1)) / 100), 0.1)
        main(grid, context)

    return app


def _simulate(cfg: FederationConfig, cpus, verbose: bool, client_app, server_app):
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    with tempfile.TemporaryDirectory(prefix="fedal-app-") as app_dir:
        Path(app_dir, "pyproject.toml").write_text(app_pyproject(cfg))
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.to_run_config())
        result = _run_simulation(
            num_supernodes=cfg.clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config(cpus, cfg),
            server_app_context=context,
            app_dir=app_dir,
            is_app=True,
            verbose_logging=verbose,
        )
    return result
