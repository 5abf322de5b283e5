"""Every contract in txkernel, as zope interfaces.

The core services implement these; each network adapter has a server half
that exposes one of them and a client half that implements the *same*
interface over a remote reference. Methods return Deferreds unless stated
otherwise; each docstring says what the Deferred fires with and how it fails.

Conventions used throughout:

``targets``
    an ``int`` engine id, a list/tuple of ints, or the string ``'all'``.
    Anything else, or an unregistered id, fails with
    :class:`kernel.error.InvalidEngineID`; ``'all'`` with no engines fails with
    :class:`kernel.error.NoEnginesRegistered`.
multiplexed results
    a method of :class:`IMultiEngine` fires with a list holding one entry per
    target engine, in the order of the resolved targets; if any engine fails,
    the call fails with one :class:`kernel.error.CompositeError` describing
    every failing engine (the other engines' work still completes).
serialized payloads
    a :class:`kernel.serialized.Serialized` is an opaque blob; the controller
    routes it without unpickling it.
"""

from zope.interface import Attribute, Interface

# ---------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------


class IEngineCore(Interface):
    """A single engine: a persistent Python namespace that runs code."""

    id = Attribute("The engine's int id, or None until the controller assigns one.")
    properties = Attribute("A dict of plain data describing the engine (str keys).")

    def execute(lines):
        """Run the Python source ``lines`` in the engine's namespace.

        :returns: Deferred firing a result dict with keys ``id`` (engine id),
            ``number`` (the command's index in this engine's history),
            ``input`` (``lines``), ``stdout`` and ``stderr`` (text captured while
            the command ran). The dict is kept as history for :meth:`get_result`.
        :raises: (errback) the exception raised by the user's code, carrying the
            engine's traceback text (see :func:`kernel.error.engine_failure_info`);
            ``KeyboardInterrupt`` if the command was interrupted.
        """

    def push(namespace):
        """Bind every ``name: value`` of the dict ``namespace`` in the engine.

        :returns: Deferred firing None.
        """

    def pull(keys):
        """Read values out of the namespace.

        :param keys: a str (fires the single value) or a list of str (fires a
            list of values in the same order).
        :raises: (errback) ``NameError`` naming the first missing key.
        """

    def push_function(namespace):
        """Bind functions (closures, lambdas included) by name. Fires None."""

    def pull_function(keys):
        """Pull functions by name; fires as :meth:`pull` does."""

    def get_result(i=None):
        """Fire the result dict of command ``i`` (None: the most recent).

        :raises: (errback) :class:`kernel.error.InvalidResultNumber` if there is
            no such command.
        """

    def reset():
        """Clear the user namespace (the engine's ``id`` stays bound). Fires None."""

    def keys():
        """Fire a sorted list of the names bound in the user namespace."""

    def kill():
        """Stop the engine (and, for a real process, its reactor). Fires None."""


class IEngineSerialized(Interface):
    """Moving opaque serialized objects in and out of an engine."""

    def push_serialized(namespace):
        """Bind ``name: Serialized`` pairs, deserializing on the engine. Fires None."""

    def pull_serialized(keys):
        """Fire a :class:`~kernel.serialized.Serialized` (``keys`` a str) or a
        list of them (``keys`` a list). Fails with ``NameError`` as :meth:`IEngineCore.pull`.
        """


class IEngineProperties(Interface):
    """Plain-data properties an engine advertises (used by dependencies).

    Values must be str, int, float, bool, None, or lists/dicts of those;
    anything else fails with :class:`kernel.error.InvalidProperty`.
    """

    def set_properties(properties):
        """Update the properties with the dict ``properties``. Fires None."""

    def get_properties(keys=None):
        """Fire a dict of the named properties (all of them when ``keys`` is None)."""

    def del_properties(keys):
        """Remove the named properties. Fires None."""

    def has_properties(keys):
        """Fire a list of bools, one per key: is the property set?"""

    def clear_properties():
        """Remove every property. Fires None."""


class IEngineInterrupt(Interface):
    """Interrupting the command an engine is running, without killing it."""

    def interrupt():
        """Raise ``KeyboardInterrupt`` in the running command, if any.

        :returns: Deferred firing True if a command was running and has been
            interrupted, False if the engine was idle.
        """


class IEngineTasks(Interface):
    """Running load-balanced tasks (see :mod:`kernel.task`) on one engine."""

    def run_task(payload, clear_before=False, clear_after=False):
        """Run a task on this engine.

        :param payload: a :class:`~kernel.serialized.Serialized` task body
            built by the client (opaque to the controller).
        :param clear_before: reset the namespace before running.
        :param clear_after: reset the namespace after running.
        :returns: Deferred firing a dict: ``result`` (a Serialized of the
            task's results), ``stdout``, ``stderr``, ``started`` and
            ``completed`` (POSIX timestamps taken on the engine).
        :raises: (errback) the task's exception as for :meth:`IEngineCore.execute`;
            :class:`kernel.error.UnmetDependency` when the task's functional
            dependency rejects this engine.
        """


class IEngineTaskQueue(IEngineTasks):
    """An engine that holds tasks sent ahead to it in a queue of their own.

    Commands (everything but :meth:`run_task`) overtake the waiting tasks:
    a command waits for at most the one task running when it came. A task
    waits behind every command queued before it. A waiting task can be taken
    back with :meth:`abort_task` and then never starts.
    """

    def run_task(payload, clear_before=False, clear_after=False, key=None):
        """Queue a task (see :meth:`IEngineTasks.run_task`).

        :param key: a str naming this task for :meth:`abort_task`, unique
            among the tasks sent to this engine (None: cannot be aborted).
        :raises: (errback) as :meth:`IEngineTasks.run_task`;
            :class:`kernel.error.TaskWithdrawn` if :meth:`abort_task` took it
            back before it started.
        """

    def abort_task(key, interrupt=True):
        """Take back the task ``key`` if it has not started, else (if
        ``interrupt``) interrupt it if it is running. Decided at once, on the
        engine's side: a task either never starts or is already running.

        :param interrupt: False to only take the task back (the task
            controller moving it to another engine).
        :returns: Deferred firing ``"withdrawn"`` (it will never run; its
            :meth:`run_task` fails with :class:`kernel.error.TaskWithdrawn`),
            ``"interrupted"`` (it was running and has been interrupted),
            ``"running"`` (it runs, and ``interrupt`` is false) or
            ``"finished"`` (it is not here: done, or never sent).
        """


class IEngineQueued(Interface):
    """An engine with a FIFO of commands, one in flight at a time."""

    def clear_queue():
        """Drop every queued (not yet started) command; each fails with
        :class:`kernel.error.QueueCleared`. Fires None."""

    def queue_status():
        """Fire a dict: ``queue`` (descriptions of the waiting commands, oldest
        first) and ``pending`` (description of the running command or None)."""

    def register_failure_observer(obs):
        """Call ``obs(failure)`` when the engine itself fails (dies, disconnects)."""

    def unregister_failure_observer(obs):
        """Stop calling ``obs``."""


class IEngineBase(IEngineCore, IEngineSerialized, IEngineProperties):
    """Everything an engine offers to the controller."""


# ---------------------------------------------------------------------------
# Controller
# ---------------------------------------------------------------------------


class IControllerCore(Interface):
    """The engine registry at the heart of a controller."""

    engines = Attribute("A dict mapping engine id to the registered engine object.")

    def register_engine(remote_engine, id=None, ip=None, port=None, pid=None):
        """Register an engine.

        :param id: the id the engine asks for; honoured if free, else the lowest
            free id is given.
        :returns: a dict ``{'id': id}`` (synchronously; adapters may wrap it).
        """

    def unregister_engine(id):
        """Forget engine ``id`` and notify the unregistration observers.

        :raises: :class:`kernel.error.InvalidEngineID` if no such engine.
        """

    def on_register_engine_do(f, include_id, *args, **kwargs):
        """Call ``f(*args, **kwargs)`` (with ``id=engine_id`` added to kwargs when
        ``include_id``) each time an engine registers."""

    def on_unregister_engine_do(f, include_id, *args, **kwargs):
        """As :meth:`on_register_engine_do`, when an engine unregisters."""

    def on_register_engine_do_not(f):
        """Stop calling ``f`` on registration."""

    def on_unregister_engine_do_not(f):
        """Stop calling ``f`` on unregistration."""

    def on_n_engines_registered_do(n, f, *args, **kwargs):
        """Call ``f(*args, **kwargs)`` once, as soon as ``n`` engines are
        registered (at once if they already are)."""


# ---------------------------------------------------------------------------
# The multiengine interface
# ---------------------------------------------------------------------------


class IEngineMultiplexer(Interface):
    """The engine methods with a ``targets`` argument (see the module docstring)."""

    def execute(lines, targets="all"):
        """Fire a list of execute result dicts, one per target."""

    def push(namespace, targets="all"):
        """Push the dict ``namespace`` to every target. Fires a list of None."""

    def pull(keys, targets="all"):
        """Fire a list with one pulled value (or list of values) per target."""

    def push_function(namespace, targets="all"):
        """As :meth:`push`, for functions."""

    def pull_function(keys, targets="all"):
        """As :meth:`pull`, for functions."""

    def push_serialized(namespace, targets="all"):
        """Push ``name: Serialized`` pairs, passed through unopened."""

    def pull_serialized(keys, targets="all"):
        """Fire a list, one entry per target, of Serialized (or lists of them)."""

    def apply(func, *args, targets="all", **kwargs):
        """Call ``func(*args, **kwargs)`` on every target in one command each
        (the call serialized once, by the caller) and fire the list of return
        values in target order. ``func`` runs with its own globals, as a task
        does, not in the engine's namespace (use execute/push/pull for that).
        Failures make one :class:`kernel.error.CompositeError` naming ``apply``."""

    def apply_serialized(payload, targets="all"):
        """Run the Serialized task body ``payload`` (opaque here) with each
        target's ``run_task``, queued with its other commands; fire one
        ``run_task`` result dict per target (``result`` stays Serialized)."""

    def get_result(i=None, targets="all"):
        """Fire a list of result dicts of command ``i`` on each target."""

    def reset(targets="all"):
        """Reset each target's namespace."""

    def keys(targets="all"):
        """Fire a list of key lists."""

    def kill(controller=False, targets="all"):
        """Kill the targets (all engines, and then the controller, when
        ``controller`` is true)."""

    def clear_queue(targets="all"):
        """Clear each target's queue of waiting commands."""

    def queue_status(targets="all"):
        """Fire a list of ``(engine_id, status_dict)`` pairs."""

    def set_properties(properties, targets="all"):
        """Set properties on each target."""

    def get_properties(keys=None, targets="all"):
        """Fire a list of property dicts."""

    def del_properties(keys, targets="all"):
        """Delete properties on each target."""

    def has_properties(keys, targets="all"):
        """Fire a list of lists of bools."""

    def clear_properties(targets="all"):
        """Clear every property on each target."""


class IMultiEngine(IEngineMultiplexer):
    """A controller seen as a set of engines addressed by id."""

    def get_ids():
        """Fire the sorted list of registered engine ids."""


class IMultiEngineCoordinator(Interface):
    """Partitioning data and work over engines (done on the caller's side)."""

    def scatter(key, seq, dist="b", flatten=False, targets="all"):
        """Split ``seq`` into one contiguous block per target and bind block
        ``i`` to ``key`` on target ``i``. With ``flatten`` a block of length 1
        is bound as its single element. NumPy arrays are split as arrays."""

    def gather(key, dist="b", targets="all"):
        """Pull ``key`` from every target and concatenate the blocks (NumPy
        arrays with ``numpy.concatenate``, other sequences as one list)."""

    def raw_map(func, seqs, dist="b", targets="all"):
        """``map(func, *seqs)`` with the work split over ``targets``; fires the
        list of results in order."""


class IMultiEngineExtras(Interface):
    """Conveniences built on the multiengine methods."""

    def zip_pull(keys, targets="all"):
        """Pull several keys and fire them zipped: one tuple per key, holding
        that key's value on each target."""

    def run(filename, targets="all"):
        """Read the local file ``filename`` and execute its source on each target."""


class ISynchronousEngineMultiplexer(Interface):
    """Marker: every :class:`IEngineMultiplexer` method also takes a
    keyword-only ``block=True``. With ``block=False`` the Deferred fires at once
    with an int *pending id*, to be redeemed with ``get_pending_deferred``."""


class ISynchronousMultiEngine(ISynchronousEngineMultiplexer):
    """The multiengine interface as one client sees it: methods of
    :class:`IMultiEngine`, :class:`IMultiEngineCoordinator` and
    :class:`IMultiEngineExtras` with ``block``, plus pending-result handling.

    Pending results belong to the client that created them: each client has
    its own synchronous multiengine (adapters create one per connection).
    """

    def get_pending_deferred(deferred_id, block):
        """Fire the result of pending id ``deferred_id``, exactly once.

        :raises: (errback) :class:`kernel.error.ResultNotCompleted` if not ready
            and ``block`` is false; :class:`kernel.error.InvalidDeferredID` if the
            id is unknown or was already redeemed; the call's own failure if it
            failed.
        """

    def clear_pending_deferreds():
        """Forget every pending result of this client. Fires None."""


# ---------------------------------------------------------------------------
# The task interface
# ---------------------------------------------------------------------------


class ITask(Interface):
    """A unit of load-balanced work (see :mod:`kernel.task`)."""

    def to_spec():
        """Split the task into ``(flags, payload)``: ``flags`` a plain-data dict
        the controller schedules by (retries, dependencies, timeout, …), and
        ``payload`` the Serialized body only an engine opens."""


class ITaskController(Interface):
    """The load-balanced, fault-tolerant task queue."""

    def run(task):
        """Submit ``task`` (an :class:`ITask`). Fires the int taskid at once;
        tasks submitted before any engine registers wait for one."""

    def get_task_result(taskid, block=False):
        """Fire the :class:`kernel.task.TaskResult` of ``taskid``, or None if it is
        not done and ``block`` is false.

        :raises: (errback) :class:`kernel.error.InvalidTaskID` if unknown.
        """

    def abort(taskid):
        """Abort a task: removed if queued, interrupted if running; its result
        becomes a :class:`kernel.error.TaskAborted` failure. Fires None.

        :raises: (errback) :class:`kernel.error.InvalidTaskID`;
            :class:`kernel.error.TaskAlreadyCompleted` for a finished task.
        """

    def barrier(taskids):
        """Fire None once every task in ``taskids`` is done (whatever its outcome)."""

    def spin():
        """Run the scheduler once without submitting anything. Fires None."""

    def queue_status(verbose=False):
        """Fire a dict keyed ``pending``, ``running``, ``succeeded``, ``failed``,
        ``aborted``: counts, or lists of taskids when ``verbose``."""

    def clear(taskids=None):
        """Forget finished tasks (all of them when ``taskids`` is None). Fires None."""


class ITaskSubmission(Interface):
    """Submitting tasks without a round trip each: a client reserves a block
    of taskids, numbers its tasks itself and sends them in batches.

    Implemented by the task controller and by every network client half.
    """

    def reserve_taskids(count):
        """Grant a block of ``count`` new taskids, used by no one else and never
        handed out again (also after a controller restart on the same task
        database). Fires ``[start, stop]``: the ids ``start .. stop - 1``.

        :raises: (errback) ValueError for a count out of range.
        """

    def run_batch(specs):
        """Submit ``[taskid, flags, payload]`` specs whose taskids come from
        :meth:`reserve_taskids`, in order. A spec whose flags or payload the
        controller rejects becomes that task's failure (its TaskResult says
        why); a taskid sent again is accepted once and otherwise ignored.
        Fires ``[[taskid, exception], ...]`` for the specs refused outright
        (a taskid not granted for a new task); an empty list when all were taken.
        """


class ITaskDB(Interface):
    """Persistent records of every task a controller has seen.

    A record is a dict of plain data keyed by taskid; the key set is
    :data:`kernel.taskdb.RECORD_KEYS`. Blob fields are bytes. Methods return
    Deferreds so that a database server can answer asynchronously.
    """

    def add_record(taskid, record):
        """Store a new record. Fires None."""

    def update_record(taskid, changes):
        """Merge ``changes`` into the record. Fires None.

        :raises: (errback) KeyError if there is no such record.
        """

    def get_record(taskid):
        """Fire the record dict; KeyError if none."""

    def drop_records(taskids):
        """Delete the records. Fires None."""

    def find_records(query, keys=None):
        """Fire a list of records matching ``query``, a MongoDB-style dict whose
        values are exact values or ``{operator: argument}`` with the operators
        ``$in $nin $eq $ne $gt $gte $lt $lte`` (and the seed's ``$ge``/``$le``).
        ``keys`` limits the fields returned; ``taskid`` is always included."""

    def close():
        """Release the database. Fires None."""


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class IPendingResult(Interface):
    """A result that is not ready yet, for synchronous code.

    Like a Deferred, but waited on with :meth:`get_result`.
    """

    r = Attribute("Shortcut for ``get_result(block=True)``.")

    def get_result(default=None, block=True):
        """Return the result, or ``default`` if it is not ready and ``block``
        is false. A failure is raised now and on every later call."""

    def add_callback(f, *args, **kwargs):
        """Make :meth:`get_result` return ``f(result, *args, **kwargs)``;
        several callbacks chain in order. There is no errback chain."""


class IBlockingClientAdaptor(Interface):
    """An asynchronous client that can wrap itself in a blocking one."""

    def adapt_to_blocking_client():
        """Return a blocking client driving this one through the reactor thread."""


class IMapper(Interface):
    """An object with a parallel ``map``."""

    def map(func, *seqs):
        """Apply ``func`` elementwise over ``seqs`` in parallel; return (or fire)
        the list of results in order."""


class IParallelFunction(Interface):
    """A function wrapped by a ``parallel`` decorator."""

    def __call__(*sequences):
        """Map the wrapped function over the sequences in parallel."""
