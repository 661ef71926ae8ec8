"""The Serve app's batcher: one model (a raylib.backends backend) per replica, and the calls of
all clients batched by text count (continuous batching: a batch starts as soon as the model is
free and takes the calls waiting then, oldest first, then those nearest it in length). A
deployment of its own (`Batcher`), or inside each ingress replica (`LocalHandle`, ServeArgs.colocate)."""

import asyncio
import collections
import logging
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from raylib.ray_serve.errors import item_error
from raylib.ray_serve.settings import ServeArgs

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Batcher", health_check_period_s=10)
class Batcher:
    """One encoder (torch, onnx or onnx-int8 backend) per replica. Calls from all clients are
    batched by text count: a batch starts as soon as the model is free and takes the calls
    waiting then (continuous batching: no wait at one client, full batches under load)."""

    def __init__(self, args: dict):
        from raylib.backends import load_encoder

        self.args = ServeArgs.model_validate(args)
        gpu = self.args.num_gpus > 0 and _cuda_available()
        # Intra-op threads: default one per CPU token, so the model never competes with the
        # proxy/ingress for a core (2 torch threads on 2 busy cores ran 40x slower, see README).
        threads = self.args.torch_threads or (None if gpu else max(1, int(self.args.num_cpus)))
        self.model = load_encoder(self.args.model, self.args.backend,
                                  device="cuda" if gpu else "cpu", threads=threads)
        self.max_length = self.args.max_length or self.model.settings.max_length
        self.device = str(self.model.device)
        # Calls wait in _pending; one model thread takes them in batches and answers each on
        # its caller's event loop. The thread takes its next batch itself as soon as a forward
        # ends: no trip through the (busy) event loop between batches, so the model never idles
        # while calls wait. One thread: the model is never entered twice at once.
        self._pending: collections.deque = collections.deque()
        self._arrived = threading.Condition()
        threading.Thread(target=self._run_batches, name="model", daemon=True).start()

    def info(self) -> dict:
        """What the ingress needs to validate requests and describe the model."""
        return {**self.model.info(), "max_length": self.max_length}

    async def encode(self, item: dict) -> dict:
        """item = {texts, kind, dense, sparse, multivector, dim}; returns the outputs, or
        {"error", "status", "code"} for this call alone."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._arrived:
            self._pending.append((item, future, loop))
            self._arrived.notify()
        return await future

    def _run_batches(self) -> None:
        """The model thread: take waiting calls up to max_batch_size texts, encode, answer."""
        while True:
            batch = self._next_batch()
            try:
                results = self._encode_items([item for item, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - never leave a caller waiting
                results = [item_error(exc)] * len(batch)
            for (_, future, loop), result in zip(batch, results):
                try:
                    loop.call_soon_threadsafe(_answer, future, result)
                except RuntimeError:  # the caller's event loop is closed: nobody waits
                    pass

    def _next_batch(self) -> list[tuple]:
        """Block until a call waits; with batch_wait_timeout_s > 0 an idle model waits that
        long for max_batch_size texts. The oldest call always goes next (no call starves); the
        rest of the batch is the waiting calls closest to it in text length, so that little of
        the forward is padding (17% of the tokens of FIFO batches of 8 SciFact texts)."""
        limit, wait_s = self.args.max_batch_size, self.args.batch_wait_timeout_s
        with self._arrived:
            self._arrived.wait_for(lambda: self._pending)
            if wait_s > 0:
                deadline = time.monotonic() + wait_s
                while _count_texts(self._pending) < limit and time.monotonic() < deadline:
                    self._arrived.wait(deadline - time.monotonic())
            return take_batch(self._pending, limit)

    def _encode_items(self, items: list[dict]) -> list[dict]:
        """Group the batch by (kind, outputs), one forward per group; a group that fails is
        retried call by call, so one bad input never fails the others."""
        results: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, item in enumerate(items):
            key = (item["kind"], bool(item.get("dense", True)), bool(item.get("sparse")),
                   bool(item.get("multivector")), item.get("mcls"))
            groups[key].append(i)
        for key, members in groups.items():
            try:
                outs = self._encode_group(key, [items[i] for i in members])
            except Exception as exc:  # noqa: BLE001 - isolated below
                if len(members) == 1:
                    outs = [item_error(exc)]
                else:
                    outs = []
                    for i in members:
                        try:
                            outs += self._encode_group(key, [items[i]])
                        except Exception as one:  # noqa: BLE001 - this call's error only
                            outs.append(item_error(one))
            for i, out in zip(members, outs):
                results[i] = out
        return results

    def _encode_group(self, key: tuple, items: list[dict]) -> list[dict]:
        """Tokenize once (ids and token counts from the same pass), one forward, split per call."""
        from raylib.encoding import truncate_dims

        kind, dense, sparse, multi, mcls = key
        texts = [t for item in items for t in item["texts"]]
        ids = self.model.tokenize(texts, kind, self.max_length, padding=False)["input_ids"]
        extra = {"mcls": mcls} if mcls else {}  # MCLS: torch backend only (checked by the ingress)
        out = self.model.encode_features(ids, dense, sparse, multi, batch_size=len(ids), **extra)
        if dense and not np.isfinite(out["dense"]).all():
            raise FloatingPointError("the model produced non-finite values")
        if multi and not all(np.isfinite(m).all() for m in out["multivector"]):
            raise FloatingPointError("the model produced non-finite values")
        results, start = [], 0
        for item in items:
            n = len(item["texts"])
            res: dict[str, Any] = {"n_tokens": [len(x) for x in ids[start:start + n]]}
            if dense:
                emb, dim = out["dense"][start:start + n], item.get("dim")
                res["dense"] = truncate_dims(emb, dim).astype(np.float32) if dim else emb
            if sparse:
                rows = out["sparse"][start:start + n]
                res["sparse"] = rows
                res["sparse_tokens"] = [
                    dict(zip(row, self.model.tokenizer.convert_ids_to_tokens(list(row))))
                    for row in rows]
            if multi:
                res["multivector"] = out["multivector"][start:start + n]
            results.append(res)
            start += n
        return results

    def check_health(self) -> None:
        """A replica whose model is gone is restarted by Serve."""
        if self.model is None:
            raise RuntimeError("encoder not loaded")


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _count_texts(calls) -> int:
    """Texts waiting in (item, future, loop) calls: a batch's size is its texts, not its calls."""
    return sum(len(call[0]["texts"]) for call in calls)


def take_batch(pending: collections.deque, limit: int) -> list:
    """Remove and return the oldest call, then the waiting calls closest to it in text length,
    up to `limit` texts (the oldest goes even when it alone has more). Calls are tuples whose
    first element is the item {"texts": [...], ...}; the rest keep their order in `pending`."""
    oldest = pending.popleft()
    batch, n, anchor = [oldest], len(oldest[0]["texts"]), _longest(oldest)
    for call in sorted(pending, key=lambda c: abs(_longest(c) - anchor)):
        if n + len(call[0]["texts"]) <= limit:
            n += len(call[0]["texts"])
            batch.append(call)
    if len(batch) > 1:
        taken = {id(call) for call in batch}
        kept = [call for call in pending if id(call) not in taken]
        pending.clear()
        pending.extend(kept)
    return batch


def _longest(call) -> int:
    """Characters of the longest text of a call: its padded length in a batch, roughly."""
    return max(len(t) for t in call[0]["texts"])


def _answer(future: asyncio.Future, result: dict) -> None:
    if not future.done():  # the caller may have gone
        future.set_result(result)


# Defined before the deployments that use them: @serve.deployment captures a class's globals
# when it decorates it.
class _LocalMethod:
    """A method of an in-process object behind the handle's `.remote()` shape."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        if asyncio.iscoroutinefunction(self.fn):
            return self.fn(*args)
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.fn(*args))
        return future


class LocalHandle:
    """The Encoder in the ingress's own process (ServeArgs.colocate)."""

    def __init__(self, replica: Any):
        self.replica = replica
        self.encode, self.info = _LocalMethod(replica.encode), _LocalMethod(replica.info)
