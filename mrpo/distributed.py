"""Small collective helpers over torch.distributed (no-ops on one process)."""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist


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
