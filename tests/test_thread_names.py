"""The pipeline's threads carry their names in /proc (pipeline/thread_names.py), where the
per-thread CPU of a load test reads them; a native thread started from one inherits it."""

from __future__ import annotations

import threading
from pathlib import Path

from pipeline.pool import PipelinePool
from pipeline.thread_names import MAX_NAME_BYTES, name_thread, named_executor


def kernel_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_an_executor_thread_is_named_for_the_kernel() -> None:
    with named_executor(1, "stage-a") as executor:
        native_id = executor.submit(threading.get_native_id).result(timeout=10)
        assert kernel_name(native_id) == "stage-a"


def test_a_thread_started_from_a_named_one_inherits_the_name() -> None:
    def start_child() -> str:
        names: list[str] = []
        child = threading.Thread(
            target=lambda: names.append(kernel_name(threading.get_native_id()))
        )
        child.start()
        child.join(timeout=10)
        return names[0]

    with named_executor(1, "parent") as executor:
        assert executor.submit(start_child).result(timeout=10) == "parent"


def test_a_long_name_is_cut_to_what_the_kernel_keeps() -> None:
    def renamed() -> str:
        name_thread("a-name-longer-than-fifteen")
        return kernel_name(threading.get_native_id())

    with named_executor(1, "x") as executor:
        name = executor.submit(renamed).result(timeout=10)
    assert name == "a-name-longer-than-fifteen"[:MAX_NAME_BYTES]


def test_the_pipeline_pool_names_its_threads() -> None:
    pool = PipelinePool()
    try:
        native_id = pool.executor.submit(threading.get_native_id).result(timeout=10)
        assert kernel_name(native_id) == "pipeline-pool"
    finally:
        pool.close()
