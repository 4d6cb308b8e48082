"""The retry rule for write errors, the backoff delays and the retry scheduler."""

import errno
import threading

import pytest

from rmbgd.output.backoff import UNHEALABLE_ATTEMPTS, Scheduler, Verdict, retry_delay, write_error_verdict

RETRY, FAIL = Verdict.RETRY, Verdict.FAIL
HEALABLE = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOENT, errno.EAGAIN, errno.ESTALE, None, 99999]
UNHEALABLE = [errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ELOOP, errno.EXDEV, errno.EFBIG,
              errno.EACCES, errno.EPERM]
NAMES = [errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL]


@pytest.mark.parametrize("err", HEALABLE, ids=lambda e: errno.errorcode.get(e, str(e)))
def test_healable_errors_are_retried_for_as_long_as_they_last(err):
    assert [write_error_verdict(err, attempt) for attempt in (1, 2, 3, 10, 1000)] == [RETRY] * 5


@pytest.mark.parametrize("err", UNHEALABLE, ids=errno.errorcode.get)
def test_destination_errors_fail_after_a_few_attempts(err):
    verdicts = [write_error_verdict(err, attempt) for attempt in range(1, UNHEALABLE_ATTEMPTS + 2)]
    assert verdicts == [RETRY] * (UNHEALABLE_ATTEMPTS - 1) + [FAIL, FAIL]
    assert UNHEALABLE_ATTEMPTS == 3


@pytest.mark.parametrize("err", NAMES, ids=errno.errorcode.get)
def test_name_errors_fail_at_once(err):
    assert write_error_verdict(err, 1) is FAIL
    assert write_error_verdict(err, 1, roots_usable=False) is FAIL


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM], ids=errno.errorcode.get)
def test_permission_errors_wait_while_a_root_folder_is_unusable(err):
    # The whole outbox locked down or unmounted is the machine's state: every file waits.
    assert [write_error_verdict(err, attempt, roots_usable=False) for attempt in (1, 3, 50)] == [RETRY] * 3
    assert write_error_verdict(err, 3, roots_usable=True) is FAIL


def test_other_unhealable_errors_do_not_depend_on_the_roots():
    assert write_error_verdict(errno.ENOTDIR, 3, roots_usable=False) is FAIL


def test_attempts_count_from_one():
    with pytest.raises(ValueError):
        write_error_verdict(errno.EIO, 0)
    with pytest.raises(ValueError):
        retry_delay(0)


def test_retry_delay_doubles_up_to_a_minute():
    assert [retry_delay(n) for n in (1, 2, 3, 4, 7, 8, 100)] == [1, 2, 4, 8, 60, 60, 60]


def test_scheduler_runs_calls_in_due_order_and_reports_errors():
    ran, errors = [], []
    done = threading.Event()
    scheduler = Scheduler(on_error=errors.append)

    def call(name):
        ran.append(name)
        if name == "boom":
            raise RuntimeError("boom")
        if name == "last":
            done.set()

    assert scheduler.call_later(0.06, call, "last")
    assert scheduler.call_later(0.0, call, "first")
    assert scheduler.call_later(0.02, call, "boom")
    assert done.wait(10)
    assert ran == ["first", "boom", "last"]
    assert [str(e) for e in errors] == ["boom"]
    assert scheduler.close() == []


def test_scheduler_close_returns_what_was_waiting_and_refuses_more():
    scheduler = Scheduler(on_error=lambda exc: None)
    assert scheduler.call_later(3600, print, "never")
    assert len(scheduler) == 1
    assert scheduler.close() == [(print, ("never",))]
    assert scheduler.call_later(0, print, "too late") is False
