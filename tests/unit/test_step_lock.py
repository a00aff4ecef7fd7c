"""``StepLock``: a caller waiting between steps gets the lock before the engine's next step."""

import threading
import time

from services.engine.step_lock import StepLock


def _wait_until(cond, timeout_s=5.0):
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.001)


def test_waiting_caller_goes_before_the_next_step():
    lock, order = StepLock(max_yield_s=5.0), []
    lock.acquire_for_step()  # a step in progress

    def caller():
        with lock:
            order.append("caller")

    t = threading.Thread(target=caller)
    t.start()
    _wait_until(lambda: lock.waiting == 1)
    lock.release()  # step ends; the engine thread asks for the lock again at once
    lock.acquire_for_step()
    order.append("engine")
    lock.release()
    t.join(5)
    assert order == ["caller", "engine"]


def test_engine_waits_at_most_max_yield_for_callers():
    lock = StepLock(max_yield_s=0.01)
    with lock._state:
        lock._waiting = 1  # a caller that announced itself and never comes
    lock.acquire_for_step()  # must not hang
    lock.release()


def test_every_caller_of_a_burst_gets_in_between_two_steps():
    lock, inside = StepLock(max_yield_s=5.0), []
    lock.acquire_for_step()
    threads = [threading.Thread(target=lambda i=i: lock.__enter__() and (inside.append(i), lock.__exit__()))
               for i in range(8)]
    for t in threads:
        t.start()
    _wait_until(lambda: lock.waiting == 8)
    lock.release()
    lock.acquire_for_step()
    assert sorted(inside) == list(range(8))
    lock.release()
    for t in threads:
        t.join(5)


def test_off_loop_undoes_a_call_whose_caller_was_cancelled():
    import asyncio

    from services.engine.step_lock import off_loop

    started, release, undone = threading.Event(), threading.Event(), []

    def slow_add():
        started.set()
        release.wait(5)
        return "r1"

    async def main():
        task = asyncio.ensure_future(off_loop(slow_add, undo=undone.append))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        release.set()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"

    assert asyncio.run(main()) == "cancelled" and undone == ["r1"]
