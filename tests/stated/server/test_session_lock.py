"""SessionLock (stated.server.session_lock): one lock for coroutines on the event loop and plain threads.

Threads and coroutines exclude each other, a free lock is taken without the executor, and a coroutine
cancelled while it waits for a thread's lock does not leave the lock held once that thread lets go.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from stated.server.session_lock import SessionLock


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it."""

    def __init__(self):
        super().__init__(max_workers=4)
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def run(coroutine_function):
    """Runs `coroutine_function(executor)` on a fresh loop whose default executor counts submissions."""
    executor = CountingExecutor()

    async def main():
        asyncio.get_running_loop().set_default_executor(executor)
        return await asyncio.wait_for(coroutine_function(executor), timeout=20)

    return asyncio.run(main())


def hold_in_thread(lock: SessionLock, release: threading.Event) -> threading.Thread:
    """A thread that takes `lock` (returning once it has) and keeps it until `release` is set."""
    taken = threading.Event()

    def hold():
        with lock:
            taken.set()
            release.wait(20)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert taken.wait(10)
    return thread


def test_a_free_lock_is_taken_on_the_loop_without_the_executor():
    async def body(executor):
        lock = SessionLock()
        for _ in range(3):
            async with lock:
                assert lock.locked()
            assert not lock.locked()
        return executor.submitted

    assert run(body) == 0


def test_a_coroutine_waits_for_a_thread_and_a_thread_for_a_coroutine():
    async def body(executor):
        lock, release, order = SessionLock(), threading.Event(), []
        holder = hold_in_thread(lock, release)
        waiter = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0.2)
        assert not waiter.done(), "the coroutine took a lock a thread holds"
        order.append("thread lets go")
        release.set()
        await waiter
        order.append("coroutine holds")
        assert executor.submitted == 1
        holder.join(10)

        entered = threading.Event()

        def take():
            with lock:
                order.append("thread holds")
                entered.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        await asyncio.sleep(0.2)
        assert not entered.is_set(), "a thread took a lock a coroutine holds"
        order.append("coroutine lets go")
        lock.release()
        await asyncio.get_running_loop().run_in_executor(None, taker.join, 10)
        return order

    assert run(body) == ["thread lets go", "coroutine holds", "coroutine lets go", "thread holds"]


def test_threads_and_coroutines_never_hold_it_together():
    inside, most = [0], [0]

    def critical():
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.0005)
        inside[0] -= 1

    async def body(executor):
        lock, stop = SessionLock(), threading.Event()

        def thread_loop():
            while not stop.is_set():
                with lock:
                    critical()

        async def coroutine_loop():
            for _ in range(40):
                async with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                    await asyncio.sleep(0.0005)  # other coroutines run meanwhile, and must wait
                    inside[0] -= 1

        threads = [threading.Thread(target=thread_loop, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        await asyncio.gather(*(coroutine_loop() for _ in range(3)))
        stop.set()
        for t in threads:
            await asyncio.get_running_loop().run_in_executor(None, t.join, 10)

    run(body)
    assert most[0] == 1


async def freed(lock: SessionLock, seconds: float = 10.0) -> bool:
    """Whether the lock is free within `seconds`."""
    deadline = time.monotonic() + seconds
    while lock.locked() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return not lock.locked()


def test_a_cancelled_waiter_leaves_the_lock_free():
    async def body(executor):
        lock, release = SessionLock(), threading.Event()
        holder = hold_in_thread(lock, release)
        waiter = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0.1)
        waiter.cancel()
        try:
            await waiter
        except asyncio.CancelledError:
            pass
        assert waiter.cancelled()
        assert lock.locked(), "the thread still holds it"
        release.set()
        holder.join(10)
        # The cancelled coroutine's acquire completes in the executor, and is given back at once.
        assert await freed(lock), "a cancelled waiter left the lock held"

        async with lock:  # a coroutine takes it...
            pass

        def take():
            with lock:
                pass

        taker = threading.Thread(target=take, daemon=True)  # ...and a thread
        taker.start()
        await asyncio.get_running_loop().run_in_executor(None, taker.join, 10)
        assert not taker.is_alive()
        # The executor's acquire for the cancelled waiter may land only now, on a loaded machine (it is
        # given back as soon as it completes), so the lock is free within a bounded wait, not at once.
        assert await freed(lock)

    run(body)
