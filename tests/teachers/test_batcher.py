"""Dynamic batching: concurrent requests merge into fewer predictor runs and each caller gets its own rows.

The run function stands in for the predictor (not under test here); the batcher's threads are real.
"""
import asyncio
import contextlib
import threading
import time

import numpy as np
import pytest

from teachers.batch_check import check_batch_independence
from teachers.batcher import BatcherClosed, DynamicBatcher
from teachers.predictor_pool import PredictorTimeout


def _recording_run(sizes: list, delay: float = 0.02):
    def run(feeds, fetch, lods):
        x = feeds["x"]
        sizes.append(x.shape[0])
        time.sleep(delay)  # a predictor run takes time, so requests pile up meanwhile
        return {"y": (x * 2.0 + 1.0, [])}
    return run


def _submit_concurrently(batcher: DynamicBatcher, jobs: int, rows: int = 1) -> dict:
    results, errors = {}, []

    def client(i: int) -> None:
        try:
            x = np.full((rows, 3), float(i), dtype="float32")
            results[i] = batcher.submit({"x": x}, ["y"])["y"][0]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert sorted(results) == list(range(jobs)), "every job must get its answer"
    return results


def test_concurrent_requests_are_merged_and_split_back():
    sizes: list = []
    batcher = DynamicBatcher(_recording_run(sizes), max_batch_size=64, timeout_ms=5, runners=1)
    try:
        results = _submit_concurrently(batcher, jobs=32)
    finally:
        batcher.close()
    assert sum(sizes) == 32                       # every sample ran exactly once
    assert len(sizes) < 32 and max(sizes) > 1     # ... in merged runs
    assert batcher.merged_jobs > 0
    for i, y in results.items():                  # each caller got its own rows back
        np.testing.assert_array_equal(y, np.full((1, 3), i * 2.0 + 1.0, dtype="float32"))


def test_merged_runs_never_exceed_max_batch_size():
    sizes: list = []
    batcher = DynamicBatcher(_recording_run(sizes), max_batch_size=8, timeout_ms=5, runners=2)
    try:
        results = _submit_concurrently(batcher, jobs=24, rows=3)
    finally:
        batcher.close()
    assert sum(sizes) == 72 and max(sizes) <= 8
    for i, y in results.items():
        assert y.shape == (3, 3) and (y == i * 2.0 + 1.0).all()


def test_batching_off_runs_each_request_alone():
    sizes: list = []
    batcher = DynamicBatcher(_recording_run(sizes, delay=0.005), max_batch_size=1, timeout_ms=5, runners=1)
    try:
        results = _submit_concurrently(batcher, jobs=10)
    finally:
        batcher.close()
    assert sizes == [1] * 10
    for i, y in results.items():
        np.testing.assert_array_equal(y, np.full((1, 3), i * 2.0 + 1.0, dtype="float32"))


def test_incompatible_requests_are_not_merged():
    seen: list = []

    def run(feeds, fetch, lods):
        seen.append((tuple(fetch), feeds["x"].shape))
        time.sleep(0.01)
        return {name: (feeds["x"].reshape(feeds["x"].shape[0], -1)[:, :1], []) for name in fetch}

    batcher = DynamicBatcher(run, max_batch_size=64, timeout_ms=20, runners=1)
    outs = {}
    try:
        threads = [threading.Thread(target=lambda k=k, shape=shape, fetch=fetch: outs.__setitem__(
            k, batcher.submit({"x": np.zeros(shape, "float32")}, fetch)))
            for k, shape, fetch in [(0, (2, 3), ["a"]), (1, (2, 4), ["a"]), (2, (2, 3), ["b"])]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    finally:
        batcher.close()
    assert len(seen) == 3 and all(shape[0] == 2 for _, shape in seen)   # per-sample shape or fetch differ
    assert sorted(outs) == [0, 1, 2]
    assert set(outs[0]) == {"a"} and set(outs[1]) == {"a"} and set(outs[2]) == {"b"}
    for k in outs:
        assert next(iter(outs[k].values()))[0].shape == (2, 1)


def test_errors_reach_every_merged_caller_and_closed_batcher_refuses():
    def run(feeds, fetch, lods):
        time.sleep(0.01)
        raise RuntimeError("predictor failed on purpose")

    batcher = DynamicBatcher(run, max_batch_size=64, timeout_ms=5, runners=1)
    errors = []

    def client() -> None:
        try:
            batcher.submit({"x": np.zeros((1, 3), "float32")}, ["y"])
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    assert errors == ["predictor failed on purpose"] * 6   # six callers, six errors: none left waiting
    with pytest.raises(BatcherClosed):
        batcher.submit({"x": np.zeros((1, 3), "float32")}, ["y"])


def _blocking_run(release: threading.Event, started: list):
    def run(feeds, fetch, lods):
        started.append(feeds["x"].shape[0])
        release.wait(30)  # a wedged predictor, until the test lets it go
        return {"y": (feeds["x"], [])}
    return run


@pytest.mark.parametrize("max_batch_size", [1, 64])
def test_wedged_run_times_out_and_timed_out_jobs_never_run(max_batch_size):
    release, started = threading.Event(), []
    batcher = DynamicBatcher(_blocking_run(release, started), max_batch_size=max_batch_size, timeout_ms=1,
                             runners=1, predict_timeout=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(PredictorTimeout, match="0.3s"):
            batcher.submit({"x": np.zeros((1, 3), "float32")}, ["y"])       # runs, and hangs
        with pytest.raises(PredictorTimeout):
            batcher.submit({"x": np.zeros((2, 3), "float32")}, ["y"])       # queued behind it, gives up
        assert time.monotonic() - t0 < 5
        assert batcher.queue_depth == 1
        release.set()
        ok = batcher.submit({"x": np.ones((3, 3), "float32")}, ["y"])
        np.testing.assert_array_equal(ok["y"][0], np.ones((3, 3), "float32"))
    finally:
        release.set()
        batcher.close()
    assert started == [1, 3], "the job whose caller gave up must never run"
    assert batcher.queue_depth == 0


def test_close_returns_within_its_timeout_while_a_run_is_stuck():
    release, started = threading.Event(), []
    batcher = DynamicBatcher(_blocking_run(release, started), max_batch_size=8, timeout_ms=1, runners=1,
                             predict_timeout=30)
    stuck = batcher.submit_async({"x": np.zeros((1, 3), "float32")}, ["y"])
    wait_for_start = time.monotonic()
    while not started and time.monotonic() - wait_for_start < 10:
        time.sleep(0.01)
    queued = batcher.submit_async({"x": np.zeros((1, 4), "float32")}, ["y"])
    t0 = time.monotonic()
    finished = batcher.close(timeout=0.5)
    took = time.monotonic() - t0
    try:
        assert not finished and took < 3, took
        with pytest.raises(BatcherClosed):
            queued.result(timeout=1)
        assert not stuck.done()
        with pytest.raises(BatcherClosed):
            batcher.submit_async({"x": np.zeros((1, 3), "float32")}, ["y"])
    finally:
        release.set()
    assert stuck.result(timeout=5)["y"][0].shape == (1, 3)


def _wait_started(started: list, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not started and time.monotonic() < deadline:
        time.sleep(0.005)
    assert started, "the first job never reached the predictor"


@pytest.mark.parametrize("max_batch_size", [1, 64])
def test_loop_jobs_are_settled_by_the_runner_and_cancelled_ones_never_run(max_batch_size):
    """submit_to_loop: the runner thread settles the asyncio Future itself; a job cancelled before it starts is
    skipped, one that ran cannot be cancelled any more."""
    release, started = threading.Event(), []
    batcher = DynamicBatcher(_blocking_run(release, started), max_batch_size=max_batch_size, timeout_ms=1,
                             runners=1, predict_timeout=30)

    async def scenario():
        stuck = batcher.submit_to_loop({"x": np.zeros((1, 3), "float32")}, ["y"])
        await asyncio.get_running_loop().run_in_executor(None, _wait_started, started)
        gone = batcher.submit_to_loop({"x": np.zeros((2, 3), "float32")}, ["y"])
        assert batcher.queue_depth == 1
        assert gone.cancel() and gone.cancel()        # not started: it never will (asking twice is fine)
        release.set()
        first = await asyncio.wait_for(stuck.waiter, 10)
        assert not stuck.cancel()                    # it ran
        last = batcher.submit_to_loop({"x": np.ones((3, 3), "float32")}, ["y"])
        return first, await asyncio.wait_for(last.waiter, 10), gone.waiter.done()

    try:
        first, last, gone_settled = asyncio.run(scenario())
    finally:
        release.set()
        batcher.close()
    assert started == [1, 3], "the cancelled job must never run"
    assert not gone_settled
    assert first["y"][0].shape == (1, 3)
    np.testing.assert_array_equal(last["y"][0], np.ones((3, 3), "float32"))
    assert batcher.queue_depth == 0


def test_requests_given_up_by_the_handler_never_run():
    """InferenceHandler.handle_async on the batcher: a wedged run answers err_no 6000 after predict_timeout; a
    request queued behind it that times out, or whose coroutine is cancelled (a client gone), never runs."""
    from distill_base.proto import general_model_service_pb2 as service_pb2
    from distill_base.serving_config import ServingConfig, VarSpec
    from distill_base.status_codes import ErrNo
    from distill_base.tensor_codec import encode_tensor
    from teachers.inference import InferenceHandler

    config = ServingConfig(feeds=(VarSpec("x", "x", 1, (3,)),), fetches=(VarSpec("y", "y", 1, (3,)),))
    release, started = threading.Event(), []
    batcher = DynamicBatcher(_blocking_run(release, started), max_batch_size=64, timeout_ms=1, runners=1,
                             predict_timeout=0.3)
    handler = InferenceHandler(config, submit=batcher.submit_to_loop, predict_timeout=0.3)

    def request(rows: int) -> service_pb2.Request:
        message = service_pb2.Request(fetch_var_names=["y"])
        encode_tensor(np.full((rows, 3), rows, "float32"), name="x", out=message.tensor.add())
        return message

    async def scenario():
        t0 = time.monotonic()
        wedged = await handler.handle_async(request(1))
        waited = time.monotonic() - t0
        gone = asyncio.get_running_loop().create_task(handler.handle_async(request(2)))
        await asyncio.sleep(0.05)
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        queued = await handler.handle_async(request(4))
        release.set()
        return wedged, waited, queued, await handler.handle_async(request(5))

    try:
        wedged, waited, queued, ok = asyncio.run(scenario())
    finally:
        release.set()
        batcher.close()
    assert wedged.err_no == ErrNo.TIMEOUT and "0.3s" in wedged.err_msg and 0.25 < waited < 5
    assert queued.err_no == ErrNo.TIMEOUT
    assert ok.err_no == 0
    np.testing.assert_array_equal(np.frombuffer(ok.outputs[0].tensor[0].tensor_content, "<f4"), [5.0] * 15)
    assert started == [1, 5], "requests given up (timed out or cancelled) must never reach the predictor"


def test_jobs_queued_behind_a_busy_runner_merge_into_its_next_run():
    """Jobs that waited longer than timeout_ms for the busy runner go together in its next run, each caller
    getting its own rows back."""
    release, started = threading.Event(), []
    batcher = DynamicBatcher(_blocking_run(release, started), max_batch_size=64, timeout_ms=1, runners=1,
                             predict_timeout=30)
    try:
        first = batcher.submit_async({"x": np.zeros((1, 3), "float32")}, ["y"])
        _wait_started(started)
        queued = [batcher.submit_async({"x": np.full((2, 3), k, "float32")}, ["y"]) for k in range(3)]
        time.sleep(0.05)                   # much longer than timeout_ms
        release.set()
        results = [f.result(timeout=10)["y"][0] for f in queued]
        assert first.result(timeout=10)["y"][0].shape == (1, 3)
    finally:
        release.set()
        batcher.close()
    assert started == [1, 6], "the three waiting jobs must run as one batch"
    for k, rows in enumerate(results):
        np.testing.assert_array_equal(rows, np.full((2, 3), k, "float32"))


def test_runners_collect_batches_themselves():
    """No collector thread: with merging on, the batcher runs exactly one thread per runner."""
    before = {t.ident for t in threading.enumerate()}
    batcher = DynamicBatcher(_recording_run([], delay=0.001), max_batch_size=64, timeout_ms=5, runners=2)
    try:
        _submit_concurrently(batcher, jobs=8)
        mine = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("batch-")]
    finally:
        batcher.close()
    assert sorted(mine) == ["batch-runner-0", "batch-runner-1"]


def test_batch_independence_check():
    """Rows that depend on the batch (minus the batch mean) are found; row-wise models pass."""
    from distill_base.serving_config import ServingConfig, VarSpec

    config = ServingConfig(feeds=(VarSpec("x", "x", 1, (4,)), VarSpec("ids", "ids", 0, (2,))),
                           fetches=(VarSpec("y", "y", 1, (4,)),))
    w = np.random.default_rng(1).standard_normal((4, 4)).astype("float32")

    def rowwise(feeds, fetch, lods):
        return {"y": (np.tanh(feeds["x"] @ w) + feeds["ids"].sum(1, keepdims=True), [])}

    def centred(feeds, fetch, lods):
        y = feeds["x"] @ w
        return {"y": (y - y.mean(0, keepdims=True), [])}

    def pooled(feeds, fetch, lods):
        return {"y": (feeds["x"].sum(0, keepdims=True), [])}

    def failing(feeds, fetch, lods):
        raise RuntimeError("no")

    assert check_batch_independence(rowwise, config).independent
    verdict = check_batch_independence(centred, config)
    assert not verdict.independent and "row 0 of fetch 'y' alone differs" in verdict.reason
    verdict = check_batch_independence(pooled, config)
    assert not verdict.independent and "shape [1, 4] for a batch of 8" in verdict.reason
    assert "failed on random inputs" in check_batch_independence(failing, config).reason
    lod = ServingConfig(feeds=(VarSpec("w", "w", 0, (-1,), is_lod_tensor=True),), fetches=config.fetches)
    assert "cannot check" in check_batch_independence(rowwise, lod).reason


# -- LoopBatcher: the server's batcher, all on the event loop -------------------------------------------------
class _LoopWorkers:
    """Stands in for WorkerPool's loop interface (the worker processes are not under test here): ``size``
    workers; a run answers ``delay`` seconds after it was launched (a loop timer, no thread) with ``compute``'s
    result or error, or waits while ``hold`` is set until ``release``."""

    def __init__(self, compute, size: int = 1, delay: float = 0.02):
        self.compute, self.delay = compute, delay
        self.idle = list(range(size))
        self.sizes: list = []
        self.hold = False
        self.held: list = []
        self.loop = None
        self.on_idle = None

    def attach_loop(self, loop, on_idle):
        self.loop, self.on_idle = loop, on_idle

    def detach_loop(self, error):
        for _, _, done in self.held:
            done(None, error)
        self.held = []

    def idle_workers(self):
        return len(self.idle)

    def borrow_nowait(self):
        return self.idle.pop() if self.idle else None

    def give_back(self, worker):
        self.idle.append(worker)

    def launch(self, worker, feeds, fetch, lods, done):
        self.sizes.append(next(iter(feeds.values())).shape[0])
        entry = (worker, (dict(feeds), list(fetch), lods), done)
        if self.hold:
            self.held.append(entry)
        else:
            self.loop.call_later(self.delay, self._answer, entry)

    def release(self):
        self.hold = False
        held, self.held = self.held, []
        for entry in held:
            self.loop.call_soon(self._answer, entry)

    def _answer(self, entry):
        worker, args, done = entry
        self.idle.append(worker)
        try:
            outputs = self.compute(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the batcher as a worker's error is
            done(None, exc)
            return
        done(outputs, None)


def _double(feeds, fetch, lods):
    return {"y": (feeds["x"] * 2.0 + 1.0, [])}


async def _gather_jobs(batcher, arrays):
    jobs = [batcher.submit_to_loop({"x": x}, ["y"]) for x in arrays]
    return await asyncio.gather(*(asyncio.wait_for(j.waiter, 10) for j in jobs), return_exceptions=True)


def test_loop_batcher_merges_splits_back_and_never_exceeds_max_batch_size():
    from teachers.batcher import LoopBatcher

    async def scenario(max_batch_size, size, rows, jobs):
        workers = _LoopWorkers(_double, size=size)
        batcher = LoopBatcher(workers, max_batch_size=max_batch_size, timeout_ms=5)
        batcher.bind(asyncio.get_running_loop())
        before = threading.active_count()
        results = await _gather_jobs(batcher, [np.full((rows, 3), float(i), "float32") for i in range(jobs)])
        assert threading.active_count() == before, "the loop batcher starts no thread"
        assert await batcher.aclose(5)
        return workers.sizes, results, batcher

    sizes, results, batcher = asyncio.run(scenario(64, 1, 1, 32))
    assert sum(sizes) == 32 and len(sizes) < 32 and max(sizes) > 1 and batcher.merged_jobs > 0
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["y"][0], np.full((1, 3), i * 2.0 + 1.0, "float32"))
    sizes, results, _ = asyncio.run(scenario(8, 2, 3, 24))
    assert sum(sizes) == 72 and max(sizes) <= 8 and max(sizes) == 6
    for i, out in enumerate(results):
        assert out["y"][0].shape == (3, 3) and (out["y"][0] == i * 2.0 + 1.0).all()
    sizes, results, _ = asyncio.run(scenario(1, 1, 1, 10))
    assert sizes == [1] * 10


def test_loop_batcher_runs_a_failed_merged_batch_job_by_job_so_only_the_bad_one_fails():
    from teachers.batcher import LoopBatcher
    from teachers.errors import ModelRejectedInput, WorkerLost

    def picky(feeds, fetch, lods):
        if (feeds["x"] == 13).any():
            raise ModelRejectedInput("the model rejected feed 'x': id 13 out of range")
        return _double(feeds, fetch, lods)

    def lost(feeds, fetch, lods):
        raise WorkerLost("predictor worker 0 (pid 1) killed by SIGKILL while it held the request")

    async def scenario(compute):
        workers = _LoopWorkers(compute, size=1)
        batcher = LoopBatcher(workers, max_batch_size=64, timeout_ms=20)
        batcher.bind(asyncio.get_running_loop())
        results = await _gather_jobs(batcher, [np.full((1, 3), float(i + 10), "float32") for i in range(6)])
        await batcher.aclose(5)
        return workers.sizes, results

    sizes, results = asyncio.run(scenario(picky))
    assert sizes == [6, 1, 1, 1, 1, 1, 1], "one merged run, then each request alone"
    assert isinstance(results[3], ModelRejectedInput)
    for i, out in enumerate(results):
        if i != 3:
            np.testing.assert_array_equal(out["y"][0], np.full((1, 3), (i + 10) * 2.0 + 1.0, "float32"))
    sizes, results = asyncio.run(scenario(lost))
    assert sizes == [6], "a lost worker fails the whole batch: re-running would not tell the jobs apart"
    assert all(isinstance(r, WorkerLost) for r in results)


def test_loop_batcher_cancelled_jobs_never_run_and_close_drains_then_refuses():
    from teachers.batcher import BatcherClosed, LoopBatcher

    async def scenario():
        workers = _LoopWorkers(_double, size=1)
        batcher = LoopBatcher(workers, max_batch_size=64, timeout_ms=1)
        batcher.bind(asyncio.get_running_loop())
        workers.hold = True
        first = batcher.submit_to_loop({"x": np.zeros((1, 3), "float32")}, ["y"])
        await asyncio.sleep(0.02)                 # past timeout_ms: it runs (held) alone
        gone = batcher.submit_to_loop({"x": np.zeros((2, 3), "float32")}, ["y"])
        assert batcher.queue_depth == 1 and gone.cancel() and gone.cancel() and batcher.queue_depth == 0
        assert not first.cancel()                 # it runs already
        queued = batcher.submit_to_loop({"x": np.ones((4, 3), "float32")}, ["y"])
        workers.release()
        done = await asyncio.wait_for(asyncio.gather(first.waiter, queued.waiter), 10)
        # a stuck run: close gives up after its timeout, the stuck job and the queued one get BatcherClosed
        workers.hold = True
        stuck = batcher.submit_to_loop({"x": np.zeros((1, 3), "float32")}, ["y"])
        await asyncio.sleep(0.01)
        behind = batcher.submit_to_loop({"x": np.zeros((1, 5), "float32")}, ["y"])
        t0 = time.monotonic()
        clean = await batcher.aclose(0.3)
        took = time.monotonic() - t0
        with pytest.raises(BatcherClosed):
            batcher.submit_to_loop({"x": np.zeros((1, 3), "float32")}, ["y"])
        for job in (stuck, behind):
            with pytest.raises(BatcherClosed):
                await job.waiter
        return workers.sizes, done, clean, took, gone.waiter.done()

    sizes, done, clean, took, gone_settled = asyncio.run(scenario())
    assert sizes == [1, 4, 1], "the cancelled job never ran, the one behind the stuck run neither"
    assert not gone_settled and not clean and 0.25 < took < 3
    np.testing.assert_array_equal(done[1]["y"][0], np.full((4, 3), 3.0, "float32"))


def test_loop_batcher_submit_from_another_thread():
    """The synchronous ``submit`` (start-up code, tools) still works: from a thread other than the loop's."""
    from teachers.batcher import LoopBatcher

    loop = asyncio.new_event_loop()
    workers = _LoopWorkers(_double, size=2)
    batcher = LoopBatcher(workers, max_batch_size=64, timeout_ms=5, predict_timeout=10)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def bind():
            batcher.bind(loop)

        asyncio.run_coroutine_threadsafe(bind(), loop).result(5)
        results = _submit_concurrently(batcher, jobs=12, rows=2)
        assert asyncio.run_coroutine_threadsafe(batcher.aclose(5), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert sum(workers.sizes) == 24
    for i, y in results.items():
        np.testing.assert_array_equal(y, np.full((2, 3), i * 2.0 + 1.0, "float32"))


def test_waits_of_predict_timeout_expire_each_at_its_own_deadline_under_one_timer():
    """_Deadlines (handle_async's --predict_timeout waits): each wait expires at its own deadline, a finished
    one never does, and finished waits behind a long one do not pile up."""
    from teachers.inference import _Deadlines, _Expired

    async def scenario():
        loop = asyncio.get_running_loop()
        deadlines = _Deadlines(loop)
        start = loop.time()
        waiters, entries = [], []
        for _ in range(3):
            waiters.append(loop.create_future())
            entries.append(deadlines.add(waiters[-1], 0.2))
            await asyncio.sleep(0.05)
        waiters[1].set_result("answered")
        deadlines.done(entries[1])
        await asyncio.sleep(max(0.0, start + 0.27 - loop.time()))
        first_expired, third_pending = waiters[0].done(), not waiters[2].done()
        await asyncio.sleep(max(0.0, start + 0.4 - loop.time()))
        for entry in (entries[0], entries[2]):
            deadlines.done(entry)
        # one long wait at the head, 3000 finished behind it: the queue is compacted, not 3001 long
        long_wait = loop.create_future()
        head = deadlines.add(long_wait, 60)
        for _ in range(3000):
            deadlines.done(deadlines.add(loop.create_future(), 60))
        queued = len(deadlines._queue)
        deadlines.done(head)
        return first_expired, third_pending, waiters, queued

    first_expired, third_pending, waiters, queued = asyncio.run(scenario())
    assert first_expired and third_pending
    assert isinstance(waiters[0].exception(), _Expired) and isinstance(waiters[2].exception(), _Expired)
    assert waiters[1].result() == "answered"
    assert queued <= 1026, queued
