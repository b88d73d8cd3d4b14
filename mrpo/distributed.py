"""Small collective helpers over torch.distributed (no-ops on one process), and what keeps one rank's
fault from hanging the others:

    init_process_group(backend, timeout_s)  the process group (collective timeout) + the peer watch
    report_failure(exc)                     this rank failed: every other rank ends within ~1 s
    wait_for_all_ranks(name)                a barrier that never times out (waits on another rank's judge)
    shutdown()                              final barrier and teardown (skipped after a failure)

The peer channel is the rendezvous store (torchrun's TCPStore, which outlives the workers), not a
collective: a rank blocked in an all-gather cannot take part in another collective, but a daemon thread
polling the store can end its process (os._exit) whatever the main thread is doing, gloo or NCCL.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

log = logging.getLogger("mrpo")

EXIT_PEER_FAILED = 71        # a rank ended because another rank failed (its traceback is printed by rank 0)
POLL_S = 0.5                 # how often the peer watch reads the store
EXIT_AFTER_S = 10.0          # a failed rank whose teardown blocks longer is ended (os._exit(1))
_FAILED_KEY, _ACKS_KEY = "failed", "failed/acks"
_state = {"store": None, "failing": False, "closing": False, "watch": None}
_waits = itertools.count()   # wait_for_all_ranks is called in the same order on every rank


def is_distributed() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device(device: torch.device) -> torch.device:
    return device if device.type == "cuda" else torch.device("cpu")


def all_gather_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's x (same shape on every rank) along dim 0, rank order."""
    if not dist.is_initialized():
        return x
    local = x.to(_comm_device(device))
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.cat(out).to(x.device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a short list of numbers (float64)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_mean(metrics: dict[str, float], device: torch.device, summed: tuple[str, ...] = ()) -> dict[str, float]:
    """Mean over ranks of each metric, ignoring ranks where it is non-finite (NaN if none has it); the
    metrics whose key starts with one of `summed` (counts: failures, skips) are summed over ranks instead."""
    if not dist.is_initialized():
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    finite = torch.isfinite(vals)
    stacked = torch.stack([torch.where(finite, vals, torch.zeros_like(vals)), finite.double()])
    stacked = stacked.to(_comm_device(device))
    dist.all_reduce(stacked)
    total, count = stacked.cpu().tolist()
    return {k: (v if k.startswith(summed) else v / c) if c > 0 else float("nan")
            for k, v, c in zip(keys, total, count)}


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of every rank's integer `value` (the value itself on one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _Held(logging.Filter):
    """A handler filter that keeps the WARNING+ records of the `prefix` loggers instead of letting them print
    (each record once, however many handlers it reaches)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.records, self._seen = prefix, [], set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not (record.name == self.prefix
                                                    or record.name.startswith(self.prefix + ".")):
            return True
        if id(record) not in self._seen:
            self._seen.add(id(record))
            self.records.append(record)
        return False


def merge_warnings(per_rank: list[list[tuple[str, int, str, str]]]) -> list[tuple[str, int, str]]:
    """One line per warning from every rank's [(logger, level, template, text)]: the warnings that share a
    logger and message template are one line, the text once with the ranks that had it (identical texts)
    or each rank's text (per-rank counts and names differ). Returns [(logger, level, line)] in first-seen
    order."""
    groups: dict[tuple, dict[int, list[str]]] = {}
    for rank, records in enumerate(per_rank):
        for name, level, template, text in records:
            groups.setdefault((name, level, template), {}).setdefault(rank, []).append(text)
    out = []
    for (name, level, _), by_rank in groups.items():
        texts = {t for ts in by_rank.values() for t in ts}
        if len(texts) == 1:
            line = next(iter(texts)) + (f" [ranks {', '.join(map(str, by_rank))}]" if len(per_rank) > 1 else "")
        else:
            line = "; ".join(f"[rank {r}] {' | '.join(ts)}" for r, ts in by_rank.items())
        out.append((name, level, line))
    return out


@contextlib.contextmanager
def warnings_once(device: torch.device, prefix: str = "mrpo"):
    """Around one training step on several ranks: the warnings of the `prefix` loggers (reward, judge,
    prompt-skip summaries that every rank would print for its own share) are held, gathered and printed
    once by rank 0 (merge_warnings). One int all-reduce per step; the messages are gathered only when some
    rank has any. On an exception the held records print where they are (nothing lost, no collective)."""
    if not dist.is_initialized():
        yield
        return
    held = _Held(prefix)
    # on the handlers, not the loggers: a logger's filter misses its children's records and loggers made later
    handlers = {*logging.getLogger().handlers, logging.lastResort} - {None}
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and (name == prefix or name.startswith(prefix + ".")):
            handlers.update(lg.handlers)
    for h in handlers:
        h.addFilter(held)
    try:
        yield
    except BaseException:
        for h in handlers:
            h.removeFilter(held)
        for record in held.records:
            logging.getLogger(record.name).handle(record)
        raise
    for h in handlers:
        h.removeFilter(held)
    if all_reduce_max(len(held.records), device) == 0:
        return
    mine = [(r.name, r.levelno, str(r.msg), r.getMessage()) for r in held.records]
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    if dist.get_rank() == 0:
        for name, level, line in merge_warnings(per_rank):
            logging.getLogger(name).log(level, "%s", line)


# ----------------------------------------------------------------------------- faults and waits


def init_process_group(backend: str, timeout_s: float | None = None) -> None:
    """dist.init_process_group from torchrun's environment; timeout_s: how long a collective may wait
    for the slowest rank before the run ends (None = torch's default: 30 min gloo, 10 min NCCL). Starts
    the peer watch."""
    timeout = None if timeout_s is None else datetime.timedelta(seconds=float(timeout_s))
    dist.init_process_group(backend=backend, timeout=timeout)
    _watch_peers()


def _store():
    """The rendezvous store under the prefix mrpo/ (None on one process)."""
    if _state["store"] is None and dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_store

        _state["store"] = dist.PrefixStore("mrpo/", _get_default_store())
    return _state["store"]


def _exit_now(code: int, message: str, then=None) -> None:
    """Print `message`, flush the logs, call then() (the ack a failed rank waits for), exit at once."""
    print(message, file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers + log.handlers:
        try:
            h.flush()
        except Exception:   # noqa: BLE001 - exiting anyway
            pass
    try:
        if then is not None:
            then()
    finally:
        os._exit(code)


def _watch_peers(poll_s: float = POLL_S) -> None:
    """A daemon thread that ends this process within poll_s of another rank's report_failure (or of
    losing the store, i.e. its host died). Rank 0 prints the failed rank's traceback, so the log of
    rank 0 alone tells what happened on any node. Silent once this rank fails or shuts down itself."""
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore("mrpo/", _get_default_store().clone())   # its own connection: no contention
    rank, quit_event = dist.get_rank(), threading.Event()

    def poll() -> None:
        while not (quit_event.is_set() or _state["failing"] or _state["closing"]):
            try:
                failed = store.check([_FAILED_KEY])
                record = json.loads(store.get(_FAILED_KEY)) if failed else None
            except Exception as e:   # noqa: BLE001 - the store is gone: its host (launcher or rank 0) died
                if quit_event.is_set() or _state["failing"] or _state["closing"]:
                    return
                _exit_now(EXIT_PEER_FAILED, f"rank {rank}: lost the rendezvous store ({type(e).__name__}: {e}); "
                                            f"the launcher or rank 0 is gone: ending this rank")
                return
            if record is not None and not (_state["failing"] or _state["closing"]):
                head = (f"rank {rank}: ending because rank {record['rank']} (host {record['host']}) failed: "
                        f"{record['error']}")
                _exit_now(EXIT_PEER_FAILED, head + (f"\nrank {record['rank']}'s traceback:\n{record['traceback']}"
                                                    if rank == 0 else ""), lambda: store.add(_ACKS_KEY, 1))
            quit_event.wait(poll_s)

    thread = threading.Thread(target=poll, name="mrpo-peer-watch", daemon=True)
    thread.start()
    _state["watch"] = (thread, quit_event)
    atexit.register(_stop_watch)


def _stop_watch() -> None:
    """Stop the peer watch and wait for it: a daemon thread still inside a store call when the interpreter
    finalizes can abort the process (SIGABRT instead of our exit code)."""
    if _state["watch"] is not None:
        thread, quit_event = _state["watch"]
        quit_event.set()
        if thread is not threading.current_thread():
            thread.join(timeout=POLL_S + 5.0)


def report_failure(exc: BaseException, exit_after_s: float = EXIT_AFTER_S) -> None:
    """Tell every other rank that this one failed with `exc` (they end within POLL_S seconds, exit code
    EXIT_PEER_FAILED; this rank waits up to POLL_S + 2 s for them to have printed, as its own exit has
    torchrun end its node's workers) and skip the final barrier (shutdown). The caller re-raises, so
    this rank prints its traceback and exits 1: SIGTERM and SIGINT are ignored from here on (torchrun
    signals every worker once the first ends), and should its teardown block (a communication library
    waiting on the others), it is ended after exit_after_s. No-op on one process."""
    if not dist.is_initialized() or _state["failing"]:
        return
    _state["failing"] = True
    if threading.current_thread() is threading.main_thread():
        _ignore_stop_signals()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    try:
        store = _store()
        store.set(_FAILED_KEY, json.dumps({"rank": dist.get_rank(), "host": socket.gethostname(),
                                           "error": error, "traceback": text[-8000:]}))
        deadline = time.monotonic() + POLL_S + 2.0   # let the others print before our exit has torchrun end them
        while store.add(_ACKS_KEY, 0) < dist.get_world_size() - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception as e:   # noqa: BLE001 - the store is gone too; the launcher still sees our exit code
        log.warning("could not tell the other ranks about the failure: %s", e)
    timer = threading.Timer(exit_after_s, _exit_now, (1, f"rank {dist.get_rank()}: teardown after the failure "
                                                          f"took over {exit_after_s:.0f} s; ending now. The "
                                                          f"failure was:\n{text}"))
    timer.daemon = True
    timer.start()


def wait_for_all_ranks(name: str, poll_s: float = 1.0) -> None:
    """Block until every rank has called wait_for_all_ranks (the same calls in the same order on every
    rank), without a timeout: for waits whose length is another rank's work of unbounded length (judging
    its share of the evaluation with a slow HTTP judge), where a barrier would end the run after the
    process-group timeout. A rank that fails meanwhile ends the waiters through the peer watch; the store
    wait returns every poll_s seconds, so a stop signal is still handled."""
    store = _store()
    if store is None:
        return
    key = f"wait/{next(_waits)}/{name}"
    if store.add(key, 1) == dist.get_world_size():
        store.set(key + "/go", "1")
        return
    while True:
        try:
            store.wait([key + "/go"], datetime.timedelta(seconds=poll_s))
            return
        except dist.DistStoreError:   # not yet: wait again (store.wait's own timeout, not the collectives')
            continue


def _ignore_stop_signals() -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def shutdown() -> None:
    """End of the run: a final barrier (no rank tears the process group down while another uses it) and
    the teardown; after report_failure only what cannot block. From the barrier on, SIGTERM and SIGINT
    are ignored: the first rank to exit has torchrun signal the others, which are exiting anyway (with
    the exit code of the run, not killed by the signal)."""
    if not dist.is_initialized():
        return
    _ignore_stop_signals()
    if not _state["failing"]:
        dist.barrier()
        _state["closing"] = True
        _stop_watch()
        dist.destroy_process_group()
