"""A job in a second process: it does its work, its failure is raised naming it, and leaving the block stops it."""

import os
import shutil
import time

import pytest

from mllm_unlearn.runtime.background import background, spare_cores


def test_job_runs_in_a_second_process_and_its_log_goes_when_it_succeeds(tmp_path):
    src, dst = tmp_path / "a.txt", tmp_path / "b.txt"
    src.write_text("hello")
    with background("the copy", shutil.copyfile, src, dst, log=tmp_path / "copy.log") as job:
        assert job.process.pid != os.getpid()
        job.join()
    assert dst.read_text() == "hello"
    assert not (tmp_path / "copy.log").exists()


def test_a_failed_job_is_raised_with_its_name_and_its_traceback(tmp_path):
    missing = tmp_path / "no-such-file"
    with (
        background("the removal", os.remove, missing, log=tmp_path / "rm.log") as job,
        pytest.raises(RuntimeError, match="the removal failed in its second process") as err,
    ):
        job.join()
    assert "FileNotFoundError" in str(err.value) and str(missing) in str(err.value)
    assert (tmp_path / "rm.log").is_file()  # kept for the user to read


def test_leaving_the_block_stops_a_running_job(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), background("the sleep", time.sleep, 120, log=tmp_path / "sleep.log") as job:
        raise KeyboardInterrupt  # the main process fails while the job still runs
    assert not job.process.is_alive() and time.perf_counter() - t0 < 60


def test_spare_cores_compares_the_cores_with_the_threads():
    cores = len(os.sched_getaffinity(0))
    assert spare_cores(cores - 1) and not spare_cores(cores)
