"""Several ``alignloop serve`` replicas on one database behave as one service: the deployed
version follows the registry.

Who may call and how often is shared through the database already (keys are read at each
request, feedback writes check the key in their transaction, ``--limits database`` keeps the
rate limits and token budgets in the ``rate_buckets`` table). What each replica holds of its
own is the weights it serves; a deploy or rollback made through one replica (``POST
/admin/deploy``, ``alignloop loop --server``) or by ``alignloop deploy`` changes only the
registry's ``deployed`` mark for the others. :class:`RegistryFollower` reads those marks every
``registry_poll_seconds`` (one indexed read) and loads here what changed, as ``/admin/deploy``
would, without dropping requests (:meth:`Serving.deploy`).

A replica follows the deploys made after it started; at start it serves its ``--model``, and
says so when the registry marks another version of that name deployed (start every replica with
the same folders, or the deployed one: ``alignloop models`` lists its path).
"""

from __future__ import annotations

import logging
import threading

from alignloop.serve.dependencies import Serving

log = logging.getLogger("alignloop")


class RegistryFollower:
    """A thread that loads here each version the registry marks deployed after this server
    started, when this server does not serve it already. A version that fails to load here (its
    folder is not on this machine) is logged and not retried until the registry changes again."""

    def __init__(self, serving: Serving, interval: float) -> None:
        self.serving, self.interval = serving, interval
        self.seen = serving.store.deployed_versions()  # name → (version, path) as of the start
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False
        for name, version in self._served().items():
            marked = self.seen.get(name)
            if marked is not None and marked[0] != version:
                log.warning("serve: the registry marks %s deployed as %s (%s), but this server was started with version %s; "
                            "it serves %s until the next deploy (to serve the deployed one, start with --model %s=%s)",
                            name, marked[0], marked[1], version, version, name, marked[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a load under way finishes first

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.poll()
            except Exception as e:  # the database is away for now: keep serving, say so once, try again next time
                if not self._unreachable:
                    log.warning("serve: cannot read the registry's deployed versions (%s); retrying every %g s", e, self.interval)
                self._unreachable = True

    def poll(self) -> list[str]:
        """Load what the registry deployed since the last poll; returns the names switched here."""
        marked = self.serving.store.deployed_versions()
        self._unreachable = False
        switched = []
        for name, (version, path) in sorted(marked.items()):
            if self.seen.get(name, (None, None))[0] == version:
                continue
            self.seen[name] = (version, path)
            if self._served().get(name) == version:  # deployed here (this replica made the deploy)
                continue
            try:
                new, previous = self.serving.deploy(name, path, record=False, version=version)
            except Exception as e:  # a folder missing here, a model that fails to load: keep serving the old one
                log.error("serve: the registry deployed %s as %s (%s), which this replica cannot load (%s: %s); it keeps serving %s",
                          name, version, path, type(e).__name__, e, self._served().get(name))
                continue
            if new.version != version:
                log.warning("serve: %s at %s hashes to %s here, not %s as registered (the folder changed, or this replica "
                            "loads another dtype)", name, path, new.version, version)
            log.info("serve: %s now serves version %s (was %s), deployed through another replica", name, new.version, previous)
            switched.append(name)
        return switched

    def _served(self) -> dict[str, str]:
        serving = self.serving
        return {name: m.version for name, m in [*serving.models.items(), *serving.classifiers.items()]}
